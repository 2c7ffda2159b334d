from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.participants.models import Participant, Schedule
from app.reminders.models import ReminderSend
from app.reminders.policy import SEND_FROM, SEND_UNTIL
from app.studies.models import Wave


def unplanned_windows(session: Session, *, horizon: datetime, study_id: uuid.UUID | None,
                      limit: int) -> Sequence[Any]:
    """Windows opening before `horizon` whose sends are not rows yet (locked, skipping busy ones)."""
    query = (
        select(Schedule.id, Schedule.study_id, Schedule.participant_id, Schedule.wave, Schedule.opens_at,
               Schedule.closes_at, Participant.enrolled_at, Wave.reminder_policy)
        .join(Participant, Participant.id == Schedule.participant_id)
        .join(Wave, and_(Wave.study_id == Schedule.study_id, Wave.key == Schedule.wave))
        .where(Schedule.reminders_planned_at.is_(None), Schedule.completed_at.is_(None),
               Schedule.opens_at <= horizon)
        .order_by(Schedule.opens_at)
        .limit(limit)
        .with_for_update(of=Schedule, skip_locked=True)
    )
    if study_id is not None:
        query = query.where(Schedule.study_id == study_id)
    return session.execute(query).all()


_LOCK_PARTICIPANTS = text("SELECT id, withdrawn_at, timezone FROM participants WHERE id = ANY(:ids) "
                          "ORDER BY id FOR SHARE SKIP LOCKED")


def lock_participants(session: Session, ids: list[uuid.UUID]) -> dict[uuid.UUID, Any]:
    """Lock the participants whose sends are about to be planned (FOR SHARE, skipping those a writer
    holds): the send rows' trigger takes these locks anyway, and taking them here first means the
    planner, which already holds the schedules, never waits for a writer that waits for it. Their
    withdrawal and zone as of now, by id; a participant not returned is planned by a later scan."""
    if not ids:
        return {}
    return {r.id: r for r in session.execute(_LOCK_PARTICIPANTS, {"ids": ids})}


def add_sends(session: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        session.execute(insert(ReminderSend).values(rows).on_conflict_do_nothing(
            index_elements=[ReminderSend.participant_id, ReminderSend.wave, ReminderSend.kind]))


def mark_planned(session: Session, schedule_ids: list[uuid.UUID], at: datetime) -> None:
    if schedule_ids:
        session.execute(update(Schedule).where(Schedule.id.in_(schedule_ids)).values(reminders_planned_at=at))


# What becomes of each due send, decided in the claim query itself (the order of the checks is
# the rule): the window closed, a later message of the wave is due too, or no sending hours are
# left before it closes -> skipped; outside sending hours -> deferred (pending, due at the next
# opening of them); otherwise sent now. A withdrawal or a completed wave has already cancelled
# the send in the database (the triggers of migration 9b3e5d7f1a24), so the query reads the send
# rows alone: their copies of the window's close and the participant's zone. `rank` orders the
# kinds of a wave as `service.kind_rank` does.
# Sending hours in the participant's zone (`c.local_now` is `:now` there), as `policy.in_sending_hours`
# and `policy.into_sending_hours` have them (a test holds them to it).
IN_HOURS = "CAST(c.local_now AS time) >= :send_from AND CAST(c.local_now AS time) < :send_until"
NEXT_HOURS = ("(CAST(c.local_now AS date) + CASE WHEN CAST(c.local_now AS time) < :send_from THEN 0 ELSE 1 END "
              "+ CAST(:send_from AS time)) AT TIME ZONE c.timezone")
_RANK = """CASE WHEN {k} = 'invitation' THEN 0 WHEN {k} = 'final' THEN 10000
    WHEN {k} ~ '^reminder_[0-9]+$' THEN substr({k}, 10)::int ELSE 5000 END"""

_DUE = """
WITH claimed AS (
    SELECT r.ctid AS row_ctid, r.id, r.study_id, r.participant_id, r.wave, r.kind, r.due_at, r.attempts,
           r.timezone, r.closes_at, CAST(:now AS timestamptz) AT TIME ZONE r.timezone AS local_now
    FROM reminder_sends r
    WHERE r.status = 'pending' AND r.due_at <= :now {study}
    ORDER BY r.due_at LIMIT :limit
    FOR UPDATE OF r SKIP LOCKED
), timed AS MATERIALIZED (
    SELECT c.*, {in_hours} AS in_hours, {next_hours} AS next_hours,
           :now < c.closes_at AND EXISTS (
               SELECT FROM reminder_sends l
               WHERE l.participant_id = c.participant_id AND l.wave = c.wave AND l.status = 'pending'
                 AND l.due_at <= :now AND (l.due_at, {rank_l}) > (c.due_at, {rank_c})) AS superseded
    FROM claimed c
), decided AS (
    SELECT t.*,
           CASE WHEN :now >= t.closes_at OR t.superseded THEN 'skipped'
                WHEN t.in_hours THEN 'send'
                WHEN t.next_hours >= t.closes_at THEN 'skipped'
                ELSE 'deferred' END AS outcome,
           CASE WHEN :now >= t.closes_at THEN 'the window closed before it was sent'
                WHEN t.superseded THEN 'a later message of this wave was due'
                WHEN t.in_hours THEN NULL
                WHEN t.next_hours >= t.closes_at THEN 'no sending hours left in the window'
                END AS reason
    FROM timed t
){record}
SELECT d.id, d.outcome, d.reason, CASE WHEN d.outcome = 'deferred' THEN d.next_hours END AS next_hours,
       {for_sending}
FROM decided d {recorded}
"""
# Recording in the same statement: every close and deferral of the batch, found by the position
# the claim locked (no index probe). A send that another transaction changed between this
# statement's snapshot and its lock is found at its new position, which this statement cannot
# see: it is neither recorded nor returned, stays pending, and a later scan decides it.
_RECORD = """, recorded AS (
    UPDATE reminder_sends r
    SET status = CASE WHEN d.outcome = 'deferred' THEN 'pending' ELSE d.outcome END,
        last_error = coalesce(d.reason, r.last_error),
        due_at = CASE WHEN d.outcome = 'deferred' THEN d.next_hours ELSE r.due_at END, updated_at = now()
    FROM decided d WHERE r.ctid = d.row_ctid AND r.id = d.id AND r.status = 'pending' AND d.outcome <> 'send'
    RETURNING r.id
)"""
# what a message needs, read (and sent back) only for the ones sent now
_FOR_SENDING = ",\n       ".join(f"CASE WHEN d.outcome = 'send' THEN {value} END AS {name}" for name, value in (
    ("study_id", "d.study_id"), ("participant_id", "d.participant_id"), ("wave", "d.wave"), ("kind", "d.kind"),
    ("attempts", "d.attempts"), ("timezone", "d.timezone"), ("closes_at", "d.closes_at"),
    ("external_id", "(SELECT p.external_id FROM participants p WHERE p.id = d.participant_id)")))
_DUE_QUERIES = {
    (record, study is not None): text(_DUE.format(
        study=study or "", in_hours=IN_HOURS, next_hours=NEXT_HOURS, for_sending=_FOR_SENDING,
        rank_l=_RANK.format(k="l.kind"), rank_c=_RANK.format(k="c.kind"),
        record=_RECORD if record else "",
        recorded="WHERE d.outcome = 'send' OR d.id IN (SELECT id FROM recorded)" if record else ""))
    for record in (False, True) for study in (None, "AND r.study_id = :study")
}


_SENDING_HOURS = text(  # built from this module's constants only
    f"SELECT {IN_HOURS}, {NEXT_HOURS} FROM (SELECT CAST(:now AS timestamptz) AT TIME ZONE CAST(:zone AS text) "  # noqa: S608
    "AS local_now, CAST(:zone AS text) AS timezone) c")


def sending_hours(session: Session, now: datetime, zone: str) -> tuple[bool, datetime]:
    """The claim query's sending hours at `now` in `zone`: (within them, when they next open)."""
    row = session.execute(_SENDING_HOURS, {"now": now, "zone": zone, "send_from": SEND_FROM,
                                           "send_until": SEND_UNTIL}).one()
    return bool(row[0]), row[1]


def due(session: Session, *, now: datetime, study_id: uuid.UUID | None, limit: int,
        record: bool = False) -> Sequence[Any]:
    """Claim pending sends due by `now` (FOR UPDATE SKIP LOCKED) and decide about each in the same
    query: its `outcome` (send, deferred, skipped), the `reason` recorded for a send that is not
    made, `next_hours` (when a deferred one falls due again) and, for the ones to send, what the
    message needs. With `record`, the same statement also records every outcome but `send` (one
    statement, and one audit trigger run, for the batch)."""
    params = {"now": now, "limit": limit, "send_from": SEND_FROM, "send_until": SEND_UNTIL}
    if study_id is not None:
        params["study"] = study_id
    return session.execute(_DUE_QUERIES[record, study_id is not None], params).all()


def set_outcome(session: Session, send_id: uuid.UUID, *, expect: tuple[str, ...] = ("pending",),
                owner: uuid.UUID | None = None, **values: Any) -> bool:
    query = update(ReminderSend).where(ReminderSend.id == send_id, ReminderSend.status.in_(expect))
    if owner is not None:
        query = query.where(ReminderSend.claimed_by == owner)
    result = session.execute(query.values(updated_at=func.now(), **values))
    return bool(getattr(result, "rowcount", 0))


_QUIET = text("SELECT set_config('cohort.audit_quiet', :table, true)")


@contextmanager
def _unaudited(session: Session) -> Iterator[None]:
    """Lease bookkeeping: the audit trail records what happened to a send, not each lease taken."""
    session.execute(_QUIET, {"table": ReminderSend.__tablename__})
    try:
        yield
    finally:
        session.execute(_QUIET, {"table": ""})


def lease_many(session: Session, ids: list[uuid.UUID], owner: uuid.UUID, until: datetime) -> None:
    if ids:
        with _unaudited(session):
            session.execute(update(ReminderSend).where(ReminderSend.id.in_(ids), ReminderSend.status == "pending")
                            .values(status="sending", attempts=ReminderSend.attempts + 1, lease_expires_at=until,
                                    claimed_by=owner, updated_at=func.now()))


def renew_lease(session: Session, send_id: uuid.UUID, owner: uuid.UUID, until: datetime) -> bool:
    """Still ours? Extend the lease just before sending; False if another scanner took it over."""
    with _unaudited(session):
        result = session.execute(
            update(ReminderSend)
            .where(ReminderSend.id == send_id, ReminderSend.status == "sending", ReminderSend.claimed_by == owner)
            .values(lease_expires_at=until)
        )
    return bool(getattr(result, "rowcount", 0))


def release_expired_leases(session: Session, real_now: datetime) -> int:
    """Claims of a scanner that stopped: not yet handed to the mail server -> send again;
    handed over -> the server accepted it (the terminating dot follows the hand-over at once)."""
    handed = session.execute(
        update(ReminderSend)
        .where(ReminderSend.status == "handed_over", ReminderSend.lease_expires_at < real_now)
        .values(status="sent", sent_at=func.coalesce(ReminderSend.sent_at, ReminderSend.due_at), lease_expires_at=None,
                claimed_by=None, last_error="delivery not confirmed: the sender stopped after handing it over",
                updated_at=func.now())
    )
    result = session.execute(
        update(ReminderSend)
        .where(ReminderSend.status == "sending", ReminderSend.lease_expires_at < real_now)
        .values(status="pending", lease_expires_at=None, claimed_by=None, updated_at=func.now())
    )
    return int(getattr(result, "rowcount", 0) or 0) + int(getattr(handed, "rowcount", 0) or 0)


def hand_over(session: Session, send_id: uuid.UUID, owner: uuid.UUID, sent_at: datetime) -> bool:
    result = session.execute(
        update(ReminderSend)
        .where(ReminderSend.id == send_id, ReminderSend.status == "sending", ReminderSend.claimed_by == owner)
        .values(status="handed_over", sent_at=sent_at, updated_at=func.now())
    )
    return bool(getattr(result, "rowcount", 0))


def of_participant(session: Session, participant_id: uuid.UUID) -> list[ReminderSend]:
    return list(session.scalars(
        select(ReminderSend).where(ReminderSend.participant_id == participant_id).order_by(ReminderSend.due_at)
    ))


def replan_wave(session: Session, study_id: uuid.UUID, wave: str) -> int:
    """Forget unsent plans of a wave so the planner makes them again under the current policy."""
    session.execute(delete(ReminderSend).where(ReminderSend.study_id == study_id, ReminderSend.wave == wave,
                                               ReminderSend.status == "pending"))
    result = session.execute(
        update(Schedule).where(Schedule.study_id == study_id, Schedule.wave == wave,
                               Schedule.completed_at.is_(None)).values(reminders_planned_at=None)
    )
    return int(getattr(result, "rowcount", 0) or 0)


_sends = cast(Table, ReminderSend.__table__)
_CANCEL = (update(_sends).where(_sends.c.participant_id == bindparam("p"), _sends.c.status == "pending")
           .values(status="cancelled", last_error=bindparam("reason"), updated_at=func.now()))


def cancel_pending(session: Session, participant_id: uuid.UUID, reason: str) -> None:
    session.connection().execute(_CANCEL, {"p": participant_id, "reason": reason})


def _of_site(participant_id: Any, site_id: uuid.UUID | None) -> list[Any]:
    """Limits a query to one site's participants (none: the whole study)."""
    if site_id is None:
        return []
    return [participant_id.in_(select(Participant.id).where(Participant.site_id == site_id))]


def sent_counts(session: Session, study_id: uuid.UUID, as_of: datetime,
                site_id: uuid.UUID | None = None) -> Sequence[Any]:
    return session.execute(
        select(ReminderSend.wave, ReminderSend.kind, func.count())
        .where(ReminderSend.study_id == study_id, ReminderSend.status == "sent", ReminderSend.sent_at <= as_of,
               *_of_site(ReminderSend.participant_id, site_id))
        .group_by(ReminderSend.wave, ReminderSend.kind)
    ).all()


def preceding_contact(session: Session, study_id: uuid.UUID, as_of: datetime,
                      site_id: uuid.UUID | None = None) -> Sequence[Any]:
    """For each wave completed by `as_of`: the kind of the last message sent before completion."""
    last = (
        select(ReminderSend.kind)
        .where(ReminderSend.participant_id == Schedule.participant_id, ReminderSend.wave == Schedule.wave,
               ReminderSend.status == "sent", ReminderSend.sent_at <= Schedule.completed_at)
        .order_by(ReminderSend.sent_at.desc())
        .limit(1)
        .scalar_subquery()
    )
    completions = (
        select(Schedule.wave, func.coalesce(last, "none").label("kind"))
        .where(Schedule.study_id == study_id, Schedule.completed_at.is_not(None),
               Schedule.completed_at <= as_of, *_of_site(Schedule.participant_id, site_id))
        .subquery()
    )
    return session.execute(
        select(completions.c.wave, completions.c.kind, func.count())
        .group_by(completions.c.wave, completions.c.kind)
    ).all()



def window_of(session: Session, participant_id: uuid.UUID, wave: str) -> Any:
    """A participant's window for a wave, with what deciding about a message needs."""
    return session.execute(
        select(Schedule.opens_at, Schedule.closes_at, Schedule.completed_at, Participant.withdrawn_at)
        .join(Participant, Participant.id == Schedule.participant_id)
        .where(Schedule.participant_id == participant_id, Schedule.wave == wave)
    ).one_or_none()


def wave(session: Session, study_id: uuid.UUID, key: str) -> Wave | None:
    return session.scalar(select(Wave).where(Wave.study_id == study_id, Wave.key == key))


def waves(session: Session, study_id: uuid.UUID) -> list[Wave]:
    return list(session.scalars(select(Wave).where(Wave.study_id == study_id)))


def unplanned_schedules(session: Session, participant_id: uuid.UUID) -> list[Schedule]:
    """A participant's windows whose sends are not rows yet and that are not complete."""
    return list(session.scalars(select(Schedule).where(Schedule.participant_id == participant_id,
                                                       Schedule.reminders_planned_at.is_(None),
                                                       Schedule.completed_at.is_(None))))
