"""Retention, the coordinator's follow-up list, and abstinence outcomes: counts as of any instant.

Retention follows the contract: for each wave, `eligible` are participants whose window had
closed by `as_of`, plus those who completed by `as_of` while the window was open, leaving out
anyone who withdrew before the window opened; `completed` are the eligible with a complete
response at or before `as_of`; `rate = completed / eligible`.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, String, and_, cast, func, literal, or_, select
from sqlalchemy.orm import Session

from app.participants.models import Participant, Schedule
from app.participants.repository import schedule_status_sql
from app.responses.models import Response
from app.retention.models import RetentionCount, RetentionGroupCount, RetentionWatermark
from app.sites.models import Site
from app.studies.models import Wave

UNKNOWN_GROUP = "unknown"
NO_SITE_GROUP = "none"  # participants without a site, in `by=site`


def _baseline(study_id: uuid.UUID, baseline_wave: str) -> Any:
    return (
        select(Response.participant_id, Response.answers, Response.derived)
        .where(Response.study_id == study_id, Response.wave == baseline_wave, Response.status == "complete")
        .subquery("baseline")
    )


def retention(session: Session, study_id: uuid.UUID, waves: list[str], as_of: datetime,
              by: str | None = None, *, rollup: bool = True,
              site_id: uuid.UUID | None = None) -> dict[str | None, list[dict[str, Any]]]:
    """Per wave (and per baseline group when `by` is given): eligible, completed, rate and the rest.

    At or after the study's watermark (the usual case: now) overall and by primary group are read
    from the rollups the triggers keep; anything else is the exact aggregate over schedules. Both
    give the same numbers (tests compare them). `site_id`: one site's participants only (the
    rollups span the study, so this is the aggregate); `by="site"`: per site key (aggregate)."""
    if by is None:
        return {None: overall_and_groups(session, study_id, waves, as_of, None, rollup=rollup, site_id=site_id)[0]}
    return overall_and_groups(session, study_id, waves, as_of, by, rollup=rollup, site_id=site_id)[1]


def overall_and_groups(session: Session, study_id: uuid.UUID, waves: list[str], as_of: datetime, by: str | None,
                       *, rollup: bool = True, site_id: uuid.UUID | None = None,
                       ) -> tuple[list[dict[str, Any]], dict[str | None, list[dict[str, Any]]]]:
    """Retention overall and, with `by`, per group: from the rollups in one read when they
    answer for `as_of` (the whole study, overall or by primary group), else from the aggregate."""
    if rollup and site_id is None and (by is None or by == "primary_group"):
        watermark = session.scalar(select(func.max(RetentionWatermark.at))
                                   .where(RetentionWatermark.study_id == study_id))
        if watermark is not None and as_of >= watermark:
            if by is None:
                return _from_rollup(session, study_id, waves, as_of, groups=False)
            # the group rollup follows the study's first wave; the codebook names the baseline
            if session.scalar(_first_wave(study_id)) == waves[0]:
                return _from_rollup(session, study_id, waves, as_of, groups=True)
    overall = _aggregate(session, study_id, waves, as_of, None, site_id)
    if not overall:
        overall = {None: [_wave_row(wave, None) for wave in waves]}
    return overall[None], (_aggregate(session, study_id, waves, as_of, by, site_id) if by is not None else {})


def _first_wave(study_id: uuid.UUID) -> Any:
    return select(Wave.key).where(Wave.study_id == study_id).order_by(Wave.position, Wave.key).limit(1)


def _aggregate(session: Session, study_id: uuid.UUID, waves: list[str], as_of: datetime,
               by: str | None, site_id: uuid.UUID | None = None) -> dict[str | None, list[dict[str, Any]]]:
    at = literal(as_of)
    completed_by = and_(Schedule.completed_at.is_not(None), Schedule.completed_at <= at)
    completed_in_window = and_(completed_by, Schedule.completed_at >= Schedule.opens_at,
                               Schedule.completed_at < Schedule.closes_at)
    not_withdrawn_before = or_(Participant.withdrawn_at.is_(None), Participant.withdrawn_at >= Schedule.opens_at)
    eligible = and_(or_(Schedule.closes_at <= at, completed_in_window), not_withdrawn_before)
    status = schedule_status_sql(at)
    late = and_(completed_by, or_(Schedule.completed_at < Schedule.opens_at,
                                  Schedule.completed_at >= Schedule.closes_at))
    group = literal(None, String).label("grp")
    query = (
        select(
            Schedule.wave,
            func.count().filter(eligible).label("eligible"),
            func.count().filter(and_(eligible, completed_by)).label("completed"),
            func.count().filter(status == "open").label("open"),
            func.count().filter(status == "missed").label("missed"),
            func.count().filter(status == "withdrawn").label("withdrawn"),
            func.count().filter(and_(eligible, late)).label("late"),
        )
        .join(Participant, Participant.id == Schedule.participant_id)
        .where(Schedule.study_id == study_id, Participant.enrolled_at <= at)
    )
    if site_id is not None:
        query = query.where(Participant.site_id == site_id)
    if by == "site":
        group = func.coalesce(Site.key, NO_SITE_GROUP).label("grp")
        query = query.outerjoin(Site, Site.id == Participant.site_id)
    if by == "primary_group":
        baseline = _baseline(study_id, waves[0])
        group = func.coalesce(baseline.c.answers["primary_group"].astext, UNKNOWN_GROUP).label("grp")
        query = query.outerjoin(baseline, baseline.c.participant_id == Schedule.participant_id)
    query = query.add_columns(group).group_by(Schedule.wave, group)
    found: dict[str | None, dict[str, dict[str, int]]] = defaultdict(dict)
    for row in session.execute(query):
        found[row.grp][row.wave] = dict(row._mapping)
    return {grp: [_wave_row(wave, per_wave.get(wave)) for wave in waves]
            for grp, per_wave in sorted(found.items(), key=lambda kv: str(kv[0]))}


COUNTS = ("eligible", "completed", "open", "missed", "withdrawn", "late", "schedules")


def _rollup_totals(table: type[RetentionCount] | type[RetentionGroupCount], study_id: uuid.UUID,
                   as_of: datetime) -> Any:
    c = table
    at = literal(as_of)
    eligible = and_(c.wd_ok, or_(c.closes_at <= at, c.in_window))
    pending = c.cls == "pending"

    def total(condition: Any) -> Any:
        return func.coalesce(func.sum(c.n).filter(condition), 0)

    group = RetentionGroupCount.grp if table is RetentionGroupCount else literal(None, String)
    return (
        select(
            group.label("grp"), c.wave,
            total(eligible).label("eligible"),
            total(and_(eligible, c.cls == "completed")).label("completed"),
            total(and_(pending, c.opens_at <= at, at < c.closes_at)).label("open"),
            total(and_(pending, c.closes_at <= at)).label("missed"),
            total(c.cls == "withdrawn").label("withdrawn"),
            total(and_(eligible, c.late)).label("late"),
            func.coalesce(func.sum(c.n), 0).label("schedules"),
        )
        .where(c.study_id == study_id)
        .group_by(group, c.wave)
    )


def _from_rollup(session: Session, study_id: uuid.UUID, waves: list[str], as_of: datetime, *,
                 groups: bool) -> tuple[list[dict[str, Any]], dict[str | None, list[dict[str, Any]]]]:
    """Overall from `retention_counts`; with `groups`, each baseline group from
    `retention_group_counts` and those without one as what is left of the overall counts."""
    query = _rollup_totals(RetentionCount, study_id, as_of)
    if groups:
        query = query.union_all(_rollup_totals(RetentionGroupCount, study_id, as_of))
    found: dict[str | None, dict[str, dict[str, int]]] = defaultdict(dict)
    for row in session.execute(query):
        found[row.grp][row.wave] = {name: int(getattr(row, name)) for name in COUNTS}
    overall = [_wave_row(wave, found[None].get(wave)) for wave in waves]
    if not groups:
        return overall, {}
    everyone = found.pop(None, {})
    found.pop(UNKNOWN_GROUP, None)  # an answer spelled like the no-group row is counted in it, as the aggregate does
    unknown = {wave: {name: everyone[wave][name] - sum(g.get(wave, {}).get(name, 0) for g in found.values())
                      for name in COUNTS} for wave in everyone}
    found[UNKNOWN_GROUP] = unknown
    present = {grp: per_wave for grp, per_wave in found.items()
               if any(counts["schedules"] for counts in per_wave.values())}
    return overall, {grp: [_wave_row(wave, per_wave.get(wave)) for wave in waves]
                     for grp, per_wave in sorted(present.items(), key=lambda kv: str(kv[0]))}


def _wave_row(wave: str, counts: dict[str, Any] | None) -> dict[str, Any]:
    c = counts or {}
    eligible, completed = int(c.get("eligible", 0)), int(c.get("completed", 0))
    return {
        "wave": wave, "eligible": eligible, "completed": completed,
        "rate": completed / eligible if eligible else None,
        "open": int(c.get("open", 0)), "missed": int(c.get("missed", 0)),
        "withdrawn": int(c.get("withdrawn", 0)), "late": int(c.get("late", 0)),
    }


def open_windows(session: Session, study_id: uuid.UUID, now: datetime,
                 site_id: uuid.UUID | None = None) -> dict[str, int]:
    """How many windows of each wave are open at `now` (the worklist opens on the busiest)."""
    status = schedule_status_sql(literal(now))
    rows = session.execute(
        select(Schedule.wave, func.count()).join(Participant, Participant.id == Schedule.participant_id)
        .where(Schedule.study_id == study_id, status == "open", *_in_site(site_id)).group_by(Schedule.wave))
    return {wave: int(n) for wave, n in rows}


def followup(session: Session, study_id: uuid.UUID, *, wave: str, status: str | None, now: datetime,
             limit: int, offset: int, site_id: uuid.UUID | None = None) -> list[Any]:
    """A wave's participants, windows closing soonest first, with the last message sent to each."""
    from app.reminders.models import ReminderSend

    schedule_status = schedule_status_sql(literal(now)).label("wave_status")
    last_sent = (
        select(func.max(ReminderSend.sent_at))
        .where(ReminderSend.participant_id == Schedule.participant_id, ReminderSend.wave == Schedule.wave,
               ReminderSend.status == "sent")
        .scalar_subquery()
    )
    last_kind = (
        select(ReminderSend.kind)
        .where(ReminderSend.participant_id == Schedule.participant_id, ReminderSend.wave == Schedule.wave,
               ReminderSend.status == "sent")
        .order_by(ReminderSend.sent_at.desc()).limit(1)
        .scalar_subquery()
    )
    query = (
        select(Participant.id.label("participant_id"), Participant.external_id, Participant.status,
               Participant.timezone, Schedule.wave, Schedule.opens_at,
               Schedule.closes_at, Schedule.completed_at, schedule_status, last_sent.label("last_reminder_at"),
               last_kind.label("last_reminder_kind"))
        .join(Participant, Participant.id == Schedule.participant_id)
        .where(Schedule.study_id == study_id, Schedule.wave == wave, *_in_site(site_id))
        .order_by(Schedule.closes_at, Participant.external_id)
        .limit(limit + 1).offset(offset)
    )
    if status is not None:
        query = query.where(schedule_status_sql(literal(now)) == status)
    return list(session.execute(query).all())


def enrolment_by_month(session: Session, study_id: uuid.UUID, zone: str,
                       site_id: uuid.UUID | None = None) -> list[tuple[str, int]]:
    """Participants enrolled per calendar month of the study's time zone, oldest first."""
    month = func.to_char(func.timezone(zone, Participant.enrolled_at), "YYYY-MM")
    rows = session.execute(select(month, func.count()).where(Participant.study_id == study_id, *_in_site(site_id))
                           .group_by(month).order_by(month))
    return [(str(m), int(n)) for m, n in rows]


def outcome_counts(session: Session, study_id: uuid.UUID, baseline_wave: str, as_of: datetime,
                   by: str, site_id: uuid.UUID | None = None) -> Sequence[Any]:
    """Complete responses per wave and baseline group: how many say abstinent_30d, how many in all."""
    baseline = _baseline(study_id, baseline_wave)
    if by == "online_30d":
        grp = func.coalesce(cast(baseline.c.derived["online_30d"].astext, String), UNKNOWN_GROUP)
    elif by == "site":
        grp = func.coalesce(Site.key, NO_SITE_GROUP)
    else:
        grp = func.coalesce(baseline.c.answers["primary_group"].astext, UNKNOWN_GROUP)
    abstinent = cast(Response.derived["abstinent_30d"].astext, Boolean)
    query = (
        select(Response.wave, grp.label("grp"), func.count(abstinent).label("n"),
               func.count().filter(abstinent.is_(True)).label("abstinent"))
        .outerjoin(baseline, baseline.c.participant_id == Response.participant_id)
        .where(Response.study_id == study_id, Response.status == "complete", Response.completed_at <= as_of)
        .group_by(Response.wave, grp)
    )
    if site_id is not None or by == "site":
        query = (query.join(Participant, Participant.id == Response.participant_id)
                 .outerjoin(Site, Site.id == Participant.site_id).where(*_in_site(site_id)))
    return session.execute(query).all()


def _in_site(site_id: uuid.UUID | None) -> list[Any]:
    """The condition limiting a query with `participants` to one site (none: the whole study)."""
    return [Participant.site_id == site_id] if site_id is not None else []
