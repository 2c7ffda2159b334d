from __future__ import annotations

from fastapi import APIRouter, Response

from app.core.crypto import settings_sealer
from app.core.db import SessionDep
from app.core.deps import SettingsDep
from app.core.etag import ETAG_HEADER, IfMatch
from app.core.routing import RoleRoute
from app.core.security import Coordinator
from app.core.timeutil import utcnow
from app.participants import service as participants
from app.participants.schemas import ParticipantOut, WithdrawIn
from app.studies.deps import StudyFromPath
from app.withdrawals import service

router = APIRouter(prefix="/api/v1/studies/{key}", tags=["participants"], route_class=RoleRoute)


@router.post("/participants/{external_id}/withdraw", response_model=ParticipantOut,
             summary="Withdraw a participant (no reminder is sent afterwards)",
             description="With `If-Match` (the participant's `ETag`), a participant changed since it was read "
                         "is 412 with the current `ETag` and nothing is changed; without it, as in contract v1.",
             responses={200: {"description": "the withdrawn participant and its new `ETag`", "headers": ETAG_HEADER},
                        412: {"description": "`If-Match` is not the current version (problem+json with "
                                             "`current_etag`)"}})
def withdraw(external_id: str, body: WithdrawIn, principal: Coordinator, study: StudyFromPath,
             session: SessionDep, settings: SettingsDep, response: Response,
             if_match: IfMatch = None) -> ParticipantOut:
    now = utcnow()
    sealer = settings_sealer(settings)
    participants.require_version(session, study, external_id, sealer, if_match)
    service.withdraw(session, study, external_id, body, now)
    view = participants.view(session, study, external_id, sealer)
    response.headers["ETag"] = participants.etag(view)
    return view.out(now)
