"""The SQL behind the FHIR adapter."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.participants.models import Participant
from app.responses.models import Response, ResponseCorrection
from app.studies.models import Study


def responses_with_ids(session: Session, study_id: uuid.UUID, external_id: str | None, *,
                       updated_from: datetime | None = None, updated_to: datetime | None = None,
                       site_id: uuid.UUID | None = None) -> Sequence[tuple[Response, str]]:
    """A study's (or one site's) stored responses with their participant's external_id, by participant then wave."""
    query = (select(Response, Participant.external_id)
             .join(Participant, Participant.id == Response.participant_id)
             .where(Response.study_id == study_id).order_by(Participant.external_id, Response.wave))
    if site_id is not None:
        query = query.where(Participant.site_id == site_id)
    if external_id is not None:
        query = query.where(Participant.external_id == external_id)
    if updated_from is not None:
        query = query.where(Response.updated_at >= updated_from)
    if updated_to is not None:
        query = query.where(Response.updated_at <= updated_to)
    return [(row, ext) for row, ext in session.execute(query)]


def site_of_participant(session: Session, participant_id: uuid.UUID) -> uuid.UUID | None:
    return session.scalar(select(Participant.site_id).where(Participant.id == participant_id))


def response_with_id(session: Session, response_id: uuid.UUID) -> tuple[Response, str, str] | None:
    """One response with its participant's external_id and its study's key."""
    row = session.execute(
        select(Response, Participant.external_id, Study.key)
        .join(Participant, Participant.id == Response.participant_id)
        .join(Study, Study.id == Response.study_id)
        .where(Response.id == response_id)).one_or_none()
    return None if row is None else (row[0], row[1], row[2])


def response_of(session: Session, study_id: uuid.UUID, external_id: str, wave: str,
                site_id: uuid.UUID | None = None) -> Response | None:
    query = (select(Response).join(Participant, Participant.id == Response.participant_id)
             .where(Participant.study_id == study_id, Participant.external_id == external_id, Response.wave == wave))
    return session.scalar(query.where(Participant.site_id == site_id) if site_id is not None else query)


def corrected_items(session: Session, response_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, set[str]]:
    """Item codes each response has had corrected (for QuestionnaireResponse status `amended`)."""
    out: dict[uuid.UUID, set[str]] = {}
    if response_ids:
        for rid, after in session.execute(select(ResponseCorrection.response_id, ResponseCorrection.after)
                                          .where(ResponseCorrection.response_id.in_(response_ids))):
            out.setdefault(rid, set()).update(after or {})
    return out


def study_keys(session: Session, study_id: uuid.UUID | None) -> list[str]:
    """Every study's key (or only the one a scoped token may see)."""
    query = select(Study.key).order_by(Study.key)
    if study_id is not None:
        query = query.where(Study.id == study_id)
    return list(session.scalars(query))
