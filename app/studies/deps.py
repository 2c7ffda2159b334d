from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path

from app.core.db import SessionDep
from app.core.security import CurrentPrincipal
from app.studies import service
from app.studies.service import StudyContext


def study_from_path(
    principal: CurrentPrincipal,
    session: SessionDep,
    key: Annotated[str, Path(description="the study key", max_length=63)],
) -> StudyContext:
    return service.context(session, key, principal)


StudyFromPath = Annotated[StudyContext, Depends(study_from_path)]
