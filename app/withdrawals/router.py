from __future__ import annotations

from fastapi import APIRouter

from app.core.crypto import settings_sealer
from app.core.db import SessionDep
from app.core.deps import SettingsDep
from app.core.routing import RoleRoute
from app.core.security import Coordinator
from app.core.timeutil import utcnow
from app.participants import service as participants
from app.participants.schemas import ParticipantOut, WithdrawIn
from app.studies.deps import StudyFromPath
from app.withdrawals import service

router = APIRouter(prefix="/api/v1/studies/{key}", tags=["participants"], route_class=RoleRoute)


@router.post("/participants/{external_id}/withdraw", response_model=ParticipantOut,
             summary="Withdraw a participant (no reminder is sent afterwards)")
def withdraw(external_id: str, body: WithdrawIn, principal: Coordinator, study: StudyFromPath,
             session: SessionDep, settings: SettingsDep) -> ParticipantOut:
    now = utcnow()
    service.withdraw(session, study, external_id, body, now)
    return participants.view(session, study, external_id, settings_sealer(settings)).out(now)
