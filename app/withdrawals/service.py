"""A withdrawal and everything it sets off.

It sits above participants, reminders and responses because it changes all three: the
participant is withdrawn (open windows, contact data), no reminder is ever sent afterwards,
and under a study's delete-on-withdrawal policy the responses go too.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from app.participants import service as participants
from app.participants.models import Participant
from app.participants.schemas import WithdrawIn
from app.reminders import service as reminders
from app.responses import service as responses
from app.studies import service as studies
from app.studies.service import StudyContext
from app.webhooks import service as webhooks


def withdraw(session: Session, ctx: StudyContext, external_id: str, data: WithdrawIn, now: datetime) -> Participant:
    participant, newly = participants.mark_withdrawn(session, ctx, external_id, data, now)
    if newly:
        reminders.cancel_all(session, participant.id, "participant withdrew")
        if studies.withdrawal_policy(ctx.study) == "delete_responses":
            assert participant.withdrawn_at is not None
            responses.delete_of_participant(session, participant.id)
            participants.reopen_after_deletion(session, participant.id, participant.withdrawn_at)
        session.flush()
        webhooks.emit(session, ctx.study.id, "participant.withdrawn",
                      {"withdrawn_at": participant.withdrawn_at.isoformat() if participant.withdrawn_at else None},
                      participant_id=participant.id)
    return participant
