"""Participants: enrolment (one by one or in bulk), schedules, contact data, withdrawal."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.crypto import Sealer
from app.core.db import add_unique, is_unique_violation
from app.core.errors import Conflict, FieldError, Invalid, NotFound
from app.core.etag import etag_of, require_current
from app.idempotency import service as idempotency
from app.instruments.codebook import Codebook
from app.participants import repository
from app.participants.models import Contact, Participant, Schedule, SiteMove
from app.participants.schedule import PlannedWindow, WaveWindow, plan, status_at
from app.participants.schemas import (
    ContactIn,
    ContactOut,
    ImportError_,
    ImportResult,
    ParticipantIn,
    ParticipantOut,
    ScheduleOut,
    SiteMoveIn,
    WithdrawIn,
)
from app.sites import service as sites
from app.sites.models import Site
from app.studies.service import StudyContext
from app.webhooks import service as webhooks

CLOCK_SKEW = timedelta(minutes=5)

PARTICIPANT_COLUMNS = (("id", "uuid"), ("study_id", "uuid"), ("external_id", "text"), ("status", "text"),
                       ("enrolled_at", "timestamptz"), ("timezone", "text"), ("language", "text"),
                       ("created_at", "timestamptz"), ("site_id", "uuid"))
SCHEDULE_COLUMNS = (("study_id", "uuid"), ("participant_id", "uuid"), ("wave", "text"), ("opens_at", "timestamptz"),
                    ("due_at", "timestamptz"), ("closes_at", "timestamptz"), ("status", "text"))
CONTACT_COLUMNS = (("participant_id", "uuid"), ("sealed", "bytea"), ("updated_at", "timestamptz"))


_windows_cache: dict[str, tuple[WaveWindow, ...]] = {}


def wave_windows(codebook: Codebook) -> tuple[WaveWindow, ...]:
    cached = _windows_cache.get(codebook.sha256)
    if cached is None:
        cached = tuple(
            WaveWindow(w["key"], w["offset_days"], w["window_open_days"], w["window_close_days"])
            for w in codebook.waves()
        )
        _windows_cache[codebook.sha256] = cached
    return cached


@lru_cache(maxsize=512)
def known_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _row_problems(data: ParticipantIn, *, zone: str, now: datetime) -> list[FieldError]:
    problems: list[FieldError] = []
    if not known_zone(zone):
        problems.append({"loc": ["timezone"], "code": "timezone", "message": f"{zone!r} is not an IANA time zone"})
    if data.enrolled_at > now + CLOCK_SKEW:
        problems.append({"loc": ["enrolled_at"], "code": "future", "message": "enrolled_at is in the future"})
    return problems


def _contact_payload(contact: ContactIn | None) -> dict[str, str] | None:
    if contact is None:
        return None
    payload = {k: v for k in ("email", "phone", "name") if (v := getattr(contact, k)) is not None}
    return payload or None


@dataclass
class ParticipantView:
    """What a coordinator sees of one participant, assembled from its three tables."""

    participant: Participant
    schedules: list[Schedule]
    contact: dict[str, Any] | None
    site: str | None = None

    def out(self, now: datetime) -> ParticipantOut:
        p = self.participant
        return ParticipantOut(
            id=p.id, external_id=p.external_id, status=p.status,
            enrolled_at=p.enrolled_at, timezone=p.timezone, language=p.language, withdrawn_at=p.withdrawn_at,
            withdraw_reason=p.withdraw_reason, site=self.site,
            contact=ContactOut(**self.contact) if self.contact is not None else None,
            schedule=[
                ScheduleOut(
                    wave=s.wave, opens_at=s.opens_at, due_at=s.due_at, closes_at=s.closes_at,
                    completed_at=s.completed_at,
                    status=status_at(opens_at=s.opens_at, closes_at=s.closes_at,
                                     completed_at=s.completed_at, withdrawn_at=p.withdrawn_at, at=now),
                )
                for s in self.schedules
            ],
        )


def initial_status(statuses: list[str]) -> str:
    """`lost` when every follow-up window (all but the first) has already closed at enrolment."""
    follow_ups = statuses[1:]
    return "lost" if follow_ups and all(s == "missed" for s in follow_ups) else "active"


def _schedule_rows(participant: Participant, windows: tuple[PlannedWindow, ...], now: datetime) -> list[Schedule]:
    return [
        Schedule(
            study_id=participant.study_id, participant_id=participant.id, wave=w.wave,
            opens_at=w.opens_at, due_at=w.due_at, closes_at=w.closes_at,
            status=status_at(opens_at=w.opens_at, closes_at=w.closes_at, completed_at=None, withdrawn_at=None, at=now),
        )
        for w in windows
    ]


def _site_of(session: Session, ctx: StudyContext, key: str | None, loc: list[str | int]) -> Site | None:
    """The site a new participant joins: the named one, or a site-scoped token's own. A site-scoped
    token naming another site gets the answer an unknown site gets."""
    if key is None:
        return sites.get(session, ctx.site_id) if ctx.site_id is not None else None
    site = sites.resolve(session, ctx.study.id, key, loc)
    if ctx.site_id is not None and site.id != ctx.site_id:
        raise Invalid(f"the study has no site {key!r}",
                      errors=[{"loc": loc, "code": "unknown_site", "message": f"no site {key!r} in this study"}])
    return site


def enrol(session: Session, ctx: StudyContext, data: ParticipantIn, sealer: Sealer, now: datetime) -> ParticipantView:
    codebook = ctx.require_codebook()
    site = _site_of(session, ctx, data.site, ["site"])
    zone = data.timezone or (site.timezone if site is not None else None) or ctx.study.timezone
    problems = _row_problems(data, zone=zone, now=now)
    if problems:
        raise Invalid(problems[0]["message"], errors=problems)
    participant = Participant(
        id=uuid.uuid4(), study_id=ctx.study.id, external_id=data.external_id, status="active",
        enrolled_at=data.enrolled_at, timezone=zone, language=data.language, created_at=now,
        site_id=site.id if site is not None else None,
    )
    schedules = _schedule_rows(participant, plan(data.enrolled_at, zone, wave_windows(codebook)), now)
    participant.status = initial_status([s.status for s in schedules])
    add_unique(session, participant, f"participant {data.external_id!r} is already enrolled in this study")
    session.add_all(schedules)
    contact = _contact_payload(data.contact)
    if contact is not None:
        session.add(Contact(participant_id=participant.id, sealed=sealer.seal(contact), updated_at=now))
    session.flush()
    webhooks.emit(session, ctx.study.id, "participant.enrolled", {"enrolled_at": data.enrolled_at.isoformat()},
                  participant_id=participant.id)
    return ParticipantView(participant, schedules, contact, site.key if site is not None else None)


def any_enrolled(session: Session, study_id: uuid.UUID) -> bool:
    return repository.any_enrolled(session, study_id)


def visible(ctx: StudyContext, participant: Participant) -> bool:
    """The one rule of participant visibility inside a study: a site-scoped request sees its site's only."""
    return ctx.site_id is None or participant.site_id == ctx.site_id


def site_filter(session: Session, ctx: StudyContext, key: str | None) -> uuid.UUID | None:
    """The site a list is limited to: the request's own, or the one asked for (`?site=`). A site-scoped
    request asking for another site gets an empty list, as for a site that does not exist."""
    if key is None:
        return ctx.site_id
    site = sites.by_key(session, ctx.study.id, key)
    if site is None or (ctx.site_id is not None and site.id != ctx.site_id):
        return NO_SITE
    return site.id


NO_SITE = uuid.UUID(int=0)  # matches no participant


def find(session: Session, ctx: StudyContext, external_id: str, *, for_update: bool = False) -> Participant:
    participant = repository.by_external_id(session, ctx.study.id, external_id, for_update=for_update)
    if participant is None or not visible(ctx, participant):
        raise NotFound(f"no participant {external_id!r} in study {ctx.study.key!r}")
    return participant


def found(ctx: StudyContext, external_id: str, row: tuple[Any, ...] | None) -> Participant:
    """The participant of a row of `repository.PARTICIPANT_COLUMNS` (None: no such participant; read
    only, never added to a session)."""
    participant = Participant(**dict(zip(repository.PARTICIPANT_COLUMNS, row, strict=True))) if row else None
    if participant is None or not visible(ctx, participant):
        raise NotFound(f"no participant {external_id!r} in study {ctx.study.key!r}")
    return participant


def views(session: Session, participants: list[Participant], sealer: Sealer | None) -> list[ParticipantView]:
    """Schedules and (when `sealer` is given) contacts of a page of participants, in two queries."""
    ids = [p.id for p in participants]
    schedules = repository.schedules_of(session, ids)
    sealed = repository.sealed_contacts(session, ids) if sealer is not None else {}
    with_site = next((p for p in participants if p.site_id is not None), None)
    site_keys = sites.keys_of(session, with_site.study_id) if with_site is not None else {}
    return [
        ParticipantView(p, schedules[p.id], sealer.open(sealed[p.id]) if sealer and p.id in sealed else None,
                        site_keys.get(p.site_id) if p.site_id is not None else None)
        for p in participants
    ]


def view(session: Session, ctx: StudyContext, external_id: str, sealer: Sealer | None) -> ParticipantView:
    return views(session, [find(session, ctx, external_id)], sealer)[0]


def etag(view: ParticipantView) -> str:
    """The stored version of what a coordinator reads: the participant, its schedule and contact."""
    p = view.participant
    return etag_of("participant", p.id, p.status, p.enrolled_at, p.timezone, p.withdrawn_at, p.withdraw_reason,
                   p.site_id,
                   [(s.wave, s.opens_at, s.due_at, s.closes_at, s.status, s.completed_at) for s in view.schedules],
                   view.contact)


def versions(session: Session, participant_ids: list[uuid.UUID], sealer: Sealer) -> dict[uuid.UUID, str]:
    """The ETag of each participant (what a page renders into its forms, to send back as If-Match)."""
    return {v.participant.id: etag(v) for v in views(session, repository.by_ids(session, participant_ids), sealer)}


def require_version(session: Session, ctx: StudyContext, external_id: str, sealer: Sealer,
                    if_match: str | None) -> None:
    """Lock the participant and refuse (412) when `if_match` is given and is not its current version."""
    if if_match is None:
        return
    participant = find(session, ctx, external_id, for_update=True)
    require_current(if_match, etag(views(session, [participant], sealer)[0]), "participant")


def mark_withdrawn(session: Session, ctx: StudyContext, external_id: str, data: WithdrawIn,
                   now: datetime) -> tuple[Participant, bool]:
    """The participant's own side of a withdrawal (status, open windows, contact data); returns
    the participant and whether it withdrew just now. What a withdrawal does to reminders and
    responses belongs to the layer above (`app.withdrawals`)."""
    participant = find(session, ctx, external_id, for_update=True)
    withdrawn_at = data.withdrawn_at or now
    if withdrawn_at > now + CLOCK_SKEW:
        raise Invalid("withdrawn_at is in the future",
                      errors=[{"loc": ["withdrawn_at"], "code": "future", "message": "withdrawn_at is in the future"}])
    newly = participant.status != "withdrawn"
    if newly:
        participant.status = "withdrawn"
        participant.withdrawn_at = withdrawn_at
        participant.withdraw_reason = data.reason
        repository.withdraw_open_schedules(session, participant.id, withdrawn_at)
    if data.erase_contact:
        repository.erase_contact(session, participant.id)
        # a stored reply to the enrolment request holds the contact too (sealed): forget it
        idempotency.forget_resource(session, participant.id)
    session.flush()
    return participant, newly


def move(session: Session, ctx: StudyContext, external_id: str, data: SiteMoveIn, moved_by: uuid.UUID,
         now: datetime) -> Participant:
    """Move a participant to another site (or to none), with the reason kept beside the audited change."""
    participant = find(session, ctx, external_id, for_update=True)
    site = sites.resolve(session, ctx.study.id, data.site, ["site"]) if data.site is not None else None
    to_site_id = site.id if site is not None else None
    if to_site_id == participant.site_id:
        return participant
    session.add(SiteMove(study_id=ctx.study.id, participant_id=participant.id, from_site_id=participant.site_id,
                         to_site_id=to_site_id, reason=data.reason, moved_by=moved_by, moved_at=now))
    participant.site_id = to_site_id
    session.flush()
    return participant


def reopen_after_deletion(session: Session, participant_id: uuid.UUID, withdrawn_at: datetime) -> None:
    """Responses deleted under the study's policy: no wave counts as completed any more."""
    repository.uncomplete_schedules(session, participant_id, withdrawn_at)


# -- bulk import -------------------------------------------------------------------------------


@dataclass
class ImportRow:
    row: int
    data: ParticipantIn


def import_rows(
    session: Session, ctx: StudyContext, rows: list[ImportRow], errors: list[ImportError_], *,
    partial: bool, sealer: Sealer, now: datetime,
) -> ImportResult:
    """Insert validated rows with COPY; all-or-nothing unless `partial`.

    `errors` holds what parsing already found; duplicates (in the file and against the
    database), unknown zones and future dates are added here, one entry per row and field.
    """
    codebook = ctx.require_codebook()
    windows = wave_windows(codebook)
    first_row: dict[str, int] = {}
    for r in rows:
        prior = first_row.setdefault(r.data.external_id, r.row)
        if prior != r.row:
            errors.append(ImportError_(row=r.row, loc=["external_id"], code="duplicate",
                                       message=f"{r.data.external_id!r} already appears in row {prior}"))
    existing = repository.existing_external_ids(session, ctx.study.id, first_row)
    bad_rows = {e.row for e in errors}
    good: list[tuple[ImportRow, str, Site | None]] = []
    study_sites = {s.key: s for s in sites.of_study(session, ctx.study.id) if ctx.site_id in (None, s.id)}
    own_site = next(iter(study_sites.values())) if ctx.site_id is not None else None
    for r in rows:
        site = study_sites.get(r.data.site) if r.data.site is not None else own_site
        zone = r.data.timezone or (site.timezone if site is not None else None) or ctx.study.timezone
        problems = _row_problems(r.data, zone=zone, now=now)
        if r.data.site is not None and site is None:
            problems.append({"loc": ["site"], "code": "unknown_site",
                             "message": f"no site {r.data.site!r} in this study"})
        if r.data.external_id in existing:
            problems.append({"loc": ["external_id"], "code": "duplicate",
                             "message": f"{r.data.external_id!r} is already enrolled in this study"})
        for p in problems:
            errors.append(ImportError_(row=r.row, **p))
        if problems:
            bad_rows.add(r.row)
        elif r.row not in bad_rows:
            good.append((r, zone, site))
    errors.sort(key=lambda e: e.row)
    if errors and not partial:
        return ImportResult(created=0, errors=errors)
    try:
        _copy_participants(session, ctx, good, windows, sealer, now)
    except (IntegrityError, psycopg.errors.UniqueViolation) as exc:
        if isinstance(exc, psycopg.errors.UniqueViolation) or is_unique_violation(exc):
            raise Conflict("some of these participants were enrolled by another request meanwhile; "
                           "retry the import") from None
        raise
    return ImportResult(created=len(good), errors=errors)


def _copy_participants(
    session: Session, ctx: StudyContext, good: list[tuple[ImportRow, str, Site | None]],
    windows: tuple[WaveWindow, ...],
    sealer: Sealer, now: datetime,
) -> None:
    study_id = ctx.study.id
    participants: list[tuple[Any, ...]] = []
    schedules: list[tuple[Any, ...]] = []
    contacts: list[tuple[Any, ...]] = []
    for r, zone, site in good:
        pid = uuid.uuid4()
        statuses = []
        for w in plan(r.data.enrolled_at, zone, windows):
            status = status_at(opens_at=w.opens_at, closes_at=w.closes_at, completed_at=None, withdrawn_at=None,
                               at=now)
            statuses.append(status)
            schedules.append((study_id, pid, w.wave, w.opens_at, w.due_at, w.closes_at, status))
        participants.append((pid, study_id, r.data.external_id, initial_status(statuses), r.data.enrolled_at, zone,
                             r.data.language, now, site.id if site is not None else None))
        contact = _contact_payload(r.data.contact)
        if contact is not None:
            contacts.append((pid, sealer.seal(contact), now))
    with session.begin_nested():
        repository.copy_rows(session, "participants", PARTICIPANT_COLUMNS, participants)
        repository.copy_rows(session, "schedules", SCHEDULE_COLUMNS, schedules)  # ids: the column default
        repository.copy_rows(session, "participant_contacts", CONTACT_COLUMNS, contacts)
        webhooks.emit_many(session, study_id, "participant.enrolled",
                           [(row[0], {"enrolled_at": row[4].isoformat()}) for row in participants])
