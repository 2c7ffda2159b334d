"""The SQL behind the REDCap adapter."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.models import AuditEntry
from app.participants.models import Participant, Schedule
from app.responses.models import Response
from app.sites.models import Site
from app.studies.models import Study


def study_key(session: Session, study_id: uuid.UUID) -> str | None:
    return session.scalar(select(Study.key).where(Study.id == study_id))


def _in_site(site_id: uuid.UUID | None) -> list[Any]:
    return [Participant.site_id == site_id] if site_id is not None else []


def _next_ids(study_id: uuid.UUID, after: str, limit: int, site_id: uuid.UUID | None = None) -> Any:
    """The next `limit` external_ids of the study (of one site, with `site_id`) after `after` (keyset paging)."""
    return (select(Participant.external_id).where(Participant.study_id == study_id, Participant.external_id > after,
                                                  *_in_site(site_id))
            .order_by(Participant.external_id).limit(limit))


def responses_after(session: Session, study_id: uuid.UUID, after: str, limit: int,
                    records: set[str] | None, site_id: uuid.UUID | None = None) -> Sequence[Any]:
    """(external_id, wave, answers, status, completed_at, updated_at, completed_instruments, site) of the
    next `limit` participants; `site` is the key of the participant's site (its REDCap DAG)."""
    query = (select(Participant.external_id, Response.wave, Response.answers, Response.status,
                    Response.completed_at, Response.updated_at, Response.completed_instruments,
                    Site.key.label("site"))
             .join(Response, Response.participant_id == Participant.id)
             .outerjoin(Site, Site.id == Participant.site_id)
             .where(Participant.study_id == study_id,
                    Participant.external_id.in_(_next_ids(study_id, after, limit, site_id).scalar_subquery()))
             .order_by(Participant.external_id))
    if records:
        query = query.where(Participant.external_id.in_(records))
    return session.execute(query).all()


def last_of_page(session: Session, study_id: uuid.UUID, after: str, limit: int,
                 site_id: uuid.UUID | None = None) -> str | None:
    """The last external_id of that page if the page is full (more may follow), else None."""
    last: str | None = session.scalar(_next_ids(study_id, after, 1, site_id).offset(limit - 1))
    return last


def stored_answers(session: Session, study_id: uuid.UUID, external_id: str, wave: str,
                   site_id: uuid.UUID | None = None) -> dict[str, Any] | None:
    answers: dict[str, Any] | None = session.scalar(
        select(Response.answers).join(Participant, Participant.id == Response.participant_id)
        .where(Participant.study_id == study_id, Participant.external_id == external_id, Response.wave == wave,
               *_in_site(site_id)))
    return answers


def completed_forms(session: Session, study_id: uuid.UUID, external_id: str, wave: str,
                    site_id: uuid.UUID | None = None) -> set[str] | None:
    """The instruments already complete in a participant's response at `wave` (None: no response yet)."""
    row = session.execute(
        select(Response.status, Response.completed_instruments)
        .join(Participant, Participant.id == Response.participant_id)
        .where(Participant.study_id == study_id, Participant.external_id == external_id, Response.wave == wave,
               *_in_site(site_id))
    ).first()
    if row is None:
        return None
    return {"*"} if row.status == "complete" else set(row.completed_instruments or {})


def wave_windows(session: Session, study_id: uuid.UUID, wave: str, external_id: str | None = None,
                 site_id: uuid.UUID | None = None) -> Sequence[tuple[uuid.UUID, str, datetime, datetime | None]]:
    """(participant id, external_id, closes_at, completed_at) for one wave, by external_id."""
    query = (select(Participant.id, Participant.external_id, Schedule.closes_at, Schedule.completed_at)
             .join(Schedule, Schedule.participant_id == Participant.id)
             .where(Participant.study_id == study_id, Schedule.wave == wave, *_in_site(site_id)))
    if external_id is not None:
        query = query.where(Participant.external_id == external_id)
    return [tuple(r) for r in session.execute(query.order_by(Participant.external_id))]  # type: ignore[misc]


def audit_entries(session: Session, study_id: uuid.UUID, *, tables: Sequence[str] | None = None,
                  actions: Sequence[str] | None = None, actor: str | None = None, begin: datetime | None = None,
                  end: datetime | None = None, limit: int = 10_000) -> Sequence[AuditEntry]:
    query = select(AuditEntry).where(AuditEntry.study_id == study_id)
    if tables is not None:
        query = query.where(AuditEntry.table_name.in_(tables))
    if actions is not None:
        query = query.where(AuditEntry.action.in_(actions))
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    if begin is not None:
        query = query.where(AuditEntry.at >= begin)
    if end is not None:
        query = query.where(AuditEntry.at <= end)
    return list(session.scalars(query.order_by(AuditEntry.id.desc()).limit(limit)))


def external_ids(session: Session, study_id: uuid.UUID) -> dict[str, str]:
    """participant id (as text) -> external_id, for naming records in the log."""
    return {str(pid): ext for pid, ext in session.execute(
        select(Participant.id, Participant.external_id).where(Participant.study_id == study_id))}
