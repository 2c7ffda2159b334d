from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.codebooks import service
from app.core.db import SessionDep, on_commit
from app.core.routing import RoleRoute
from app.core.security import Coordinator, WholeStudy
from app.core.timeutil import utcnow
from app.responses.tasks import recompute_derived
from app.studies import service as studies
from app.studies.deps import StudyFromPath
from app.studies.schemas import StudyOut

router = APIRouter(prefix="/api/v1/studies", tags=["studies"], route_class=RoleRoute)


@router.put("/{key}/codebook", dependencies=[WholeStudy],
            response_model=StudyOut, summary="Install a new codebook revision",
            description="Items, rules and derived definitions may change; waves may not once participants are "
                        "enrolled. Stored derived values are recomputed under new definitions.")
def put_codebook(document: dict[str, Any], principal: Coordinator, study: StudyFromPath,
                 session: SessionDep) -> StudyOut:
    ctx, stale = service.install_revision(session, study, document, utcnow())
    if stale:
        # The due row is the guarantee (beat claims it within a minute); this only starts it sooner.
        on_commit(session, recompute_derived.delay)
    return studies.to_out(ctx)
