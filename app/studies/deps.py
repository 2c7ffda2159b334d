from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Path, Request

from app.core.admission import run_for_request
from app.core.db import SessionDep, database_of, transaction
from app.core.security import CurrentPrincipal
from app.studies import service
from app.studies.service import StudyContext

STUDY_KEY_MAX_LENGTH = 63
StudyKey = Annotated[str, Path(description="the study key", max_length=STUDY_KEY_MAX_LENGTH)]


def study_from_path(principal: CurrentPrincipal, session: SessionDep, key: StudyKey) -> StudyContext:
    return service.context(session, key, principal)


StudyFromPath = Annotated[StudyContext, Depends(study_from_path)]


def _study_id(request: Request, key: str) -> uuid.UUID:
    with transaction(database_of(request)) as session:
        return service.study_id_of_key(session, key)


async def study_key_in_scope(request: Request, principal: CurrentPrincipal, key: StudyKey) -> str:
    """The path's study key, refused (404, or 403 for another study's token) before the body is read.

    Keys never change and studies are never deleted, so once looked up the check costs no round
    trip; the study itself and its codebook in force are read where the request does its work.
    """
    known: dict[str, uuid.UUID] = request.app.state.study_ids
    study_id = known.get(key)
    if study_id is None:
        # a request waiting for a group holds no place of its own: the lookup takes one
        study_id = known[key] = await run_for_request(request, lambda: _study_id(request, key))
    principal.require_study(study_id)
    return key


StudyKeyInScope = Annotated[str, Depends(study_key_in_scope)]
