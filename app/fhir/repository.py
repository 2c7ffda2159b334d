"""The SQL behind the FHIR adapter."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.participants.models import Participant
from app.responses.models import Response


def responses_with_ids(session: Session, study_id: uuid.UUID,
                       external_id: str | None) -> Sequence[tuple[Response, str]]:
    """A study's stored responses with their participant's external_id, by participant then wave."""
    query = (select(Response, Participant.external_id)
             .join(Participant, Participant.id == Response.participant_id)
             .where(Response.study_id == study_id).order_by(Participant.external_id, Response.wave))
    if external_id is not None:
        query = query.where(Participant.external_id == external_id)
    return [(row, ext) for row, ext in session.execute(query)]
