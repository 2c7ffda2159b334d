"""Follow-up reminders: plan the sends of windows about to open, claim due ones, deliver, record.

One scan, whether the Celery beat tick (real clock) or `reminders:run?now=` (explicit clock):

1. release the leases of claims whose worker died (they go back to `pending`);
2. plan: windows opening within a day get one row per send in `reminder_sends`;
3. claim due rows with FOR UPDATE SKIP LOCKED and decide each one: skip (window closed, or a
   later send of the same wave is also due), defer (outside 09:00-20:00 local) or send (status
   `sending`, with a lease); commit. Withdrawn participants and completed waves have no pending
   sends to claim: the database cancels them when either happens, and cancels a send that would
   become pending again (a released lease, a retry) for either reason;
4. deliver each claimed message outside any transaction, then record sent / retry / failed.

A row is claimed by one scanner only and is unique per (participant, wave, kind), so two
schedulers never decide the same message twice. A worker killed mid-batch leaves leased rows:
those it had not yet handed to the mail server go back to `pending` and are sent by a later
scan; the one it had handed over (recorded between the message body and SMTP's terminating
dot) is recorded as sent. Only a kill in the microseconds between that record and the dot can
lose a message; nothing is sent twice.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.crypto import settings_sealer
from app.core.errors import Conflict, Invalid, NotFound
from app.core.settings import Settings
from app.core.timeutil import utcnow
from app.participants import repository as participants_repo
from app.participants.models import Participant
from app.reminders import repository, templates
from app.reminders.links import LinkTarget, link_for, make_token
from app.reminders.mailer import DeliveryError, Email, message_id
from app.reminders.models import ReminderSend
from app.reminders.policy import Policy, planned_sends, retry_at
from app.reminders.schemas import PolicyIn
from app.studies.models import Study, Wave
from app.webhooks import service as webhooks

log = logging.getLogger(__name__)

PLAN_HORIZON = timedelta(days=1)
LEASE = timedelta(minutes=10)
BATCH = 200


@dataclass
class ScanResult:
    planned: int = 0
    sent: int = 0
    skipped: int = 0
    failed: int = 0
    cancelled: int = 0
    deferred: int = 0
    retried: int = 0

    def add(self, other: ScanResult) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Claim:
    send_id: uuid.UUID
    study_id: uuid.UUID
    participant_id: uuid.UUID
    external_id: str
    wave: str
    kind: str
    attempts: int
    zone: str
    closes_at: datetime
    extra: dict[str, Any] = field(default_factory=dict)


def kind_rank(kind: str) -> int:
    if kind == "invitation":
        return 0
    if kind == "final":
        return 10_000
    return int(kind.rsplit("_", 1)[-1]) if kind.startswith("reminder_") else 5_000


# -- planning ----------------------------------------------------------------------------------


def plan(session: Session, now: datetime, *, study_id: uuid.UUID | None = None, limit: int = 2000) -> int:
    """Turn windows opening within a day of `now` into send rows; returns the windows planned."""
    found = repository.unplanned_windows(session, horizon=now + PLAN_HORIZON, study_id=study_id, limit=limit)
    people = repository.lock_participants(session, list({w.participant_id for w in found}))
    windows = [w for w in found if w.participant_id in people]
    rows: list[dict[str, Any]] = []
    for w in windows:
        person = people[w.participant_id]
        if person.withdrawn_at is not None:
            continue
        policy = Policy.from_dict(w.reminder_policy or {})
        for kind, due_at in planned_sends(policy, opens_at=w.opens_at, closes_at=w.closes_at,
                                          enrolled_at=w.enrolled_at, zone_name=person.timezone):
            rows.append({"id": uuid.uuid4(), "study_id": w.study_id, "participant_id": w.participant_id,
                         "wave": w.wave, "kind": kind, "due_at": due_at, "status": "pending"})
    for start in range(0, len(rows), 1000):
        repository.add_sends(session, rows[start:start + 1000])
    repository.mark_planned(session, [w.id for w in windows], utcnow())
    return len(windows)


# -- claiming ----------------------------------------------------------------------------------


def claim(session: Session, now: datetime, *, owner: uuid.UUID, study_id: uuid.UUID | None = None,
          limit: int = BATCH, lease: timedelta = LEASE) -> tuple[list[Claim], ScanResult, int]:
    """Decide about due sends; returns the ones to deliver now, the other outcomes, and rows seen.

    One statement claims, decides (see `repository.due`) and records the closes and deferrals;
    one more leases the ones to send."""
    rows = repository.due(session, now=now, study_id=study_id, limit=limit, record=True)
    result = ScanResult()
    claims: list[Claim] = []
    for r in rows:
        if r.outcome == "send":
            claims.append(Claim(r.id, r.study_id, r.participant_id, r.external_id, r.wave, r.kind,
                                r.attempts + 1, r.timezone, r.closes_at))
        else:
            setattr(result, r.outcome, getattr(result, r.outcome) + 1)
    repository.lease_many(session, [c.send_id for c in claims], owner, utcnow() + lease)
    return claims, result, len(rows)


# -- delivering --------------------------------------------------------------------------------


def _first_name(name: str | None) -> str:
    return name.split()[0] if name and name.split() else ""


def compose(session: Session, settings: Settings, claim_: Claim) -> Email | None:
    """The message for a claim, rendered from the study's current template; None without an email."""
    study = session.get(Study, claim_.study_id)
    wave = session.scalar(select(Wave.label).where(Wave.study_id == claim_.study_id, Wave.key == claim_.wave))
    sealed = participants_repo.sealed_contacts(session, [claim_.participant_id]).get(claim_.participant_id)
    contact = settings_sealer(settings).open(sealed) if sealed is not None else {}
    if not contact.get("email") or study is None:
        return None
    last_day = (claim_.closes_at - timedelta(microseconds=1)).astimezone(ZoneInfo(claim_.zone)).date()
    token = make_token(settings.secret(), LinkTarget(study.key, str(claim_.participant_id), claim_.wave,
                                                     claim_.closes_at))
    template = (study.settings or {}).get("reminder_template") or {}
    subject, body = templates.render(
        template.get("subject", templates.DEFAULT_SUBJECT), template.get("body", templates.DEFAULT_BODY),
        {"first_name": _first_name(contact.get("name")), "study_name": study.name,
         "wave_label": wave or claim_.wave, "close_date": f"{last_day:%A} {last_day.day} {last_day:%B %Y}",
         "survey_link": link_for(settings.survey_url, token), "kind": claim_.kind},
    )
    return Email(to=contact["email"], subject=subject, body=body,
                 message_id=message_id(str(claim_.send_id), "cohort.invalid"))


def release_expired_leases(session: Session, now: datetime) -> None:
    repository.release_expired_leases(session, now)


def prepare(session: Session, settings: Settings, claim_: Claim, owner: uuid.UUID,
            lease: timedelta) -> tuple[bool, Email | None, str | None]:
    """Renew the claim's lease and compose its message: (still ours, the email, why there is none).

    If the lease lapsed and another scanner has taken the message over, this one lets it go
    rather than send it a second time.
    """
    if not repository.renew_lease(session, claim_.send_id, owner, utcnow() + lease):
        return False, None, None
    try:
        email = compose(session, settings, claim_)
    except Exception as exc:  # a template or a label that cannot make a message: say so, never leave it claimed
        log.exception("reminder %s could not be composed", claim_.send_id)
        return True, None, f"the message could not be composed: {exc}"[:500]
    return True, email, None if email is not None else "no email address on file"


def record_handover(session: Session, send_id: uuid.UUID, owner: uuid.UUID, now: datetime) -> None:
    """Called between the message body and SMTP's terminating dot (see the module docstring)."""
    repository.hand_over(session, send_id, owner, now)


def outcome_of(claim_: Claim, now: datetime, error: Exception | None) -> tuple[str, dict[str, Any]]:
    """What a delivery attempt comes to: sent, retry (pending again, later) or failed, with the row's values."""
    if error is None:
        return "sent", {"status": "sent", "sent_at": now, "lease_expires_at": None, "last_error": None}
    if not isinstance(error, DeliveryError):
        log.error("reminder %s: unexpected error while sending: %r", claim_.send_id, error)
    permanent = isinstance(error, DeliveryError) and error.permanent
    again = None if permanent else retry_at(claim_.attempts, now, ZoneInfo(claim_.zone))
    if again is not None and again < claim_.closes_at:
        return "retry", {"status": "pending", "due_at": again, "lease_expires_at": None, "last_error": str(error)[:500]}
    return "failed", {"status": "failed", "lease_expires_at": None, "last_error": str(error)[:500]}


def record_outcome(session: Session, send_id: uuid.UUID, owner: uuid.UUID, values: dict[str, Any]) -> None:
    recorded = repository.set_outcome(session, send_id, expect=("sending", "handed_over"), owner=owner,
                                      claimed_by=None, **values)
    if recorded and values.get("status") == "failed" and (send := session.get(ReminderSend, send_id)) is not None:
        # the error is left out: an SMTP refusal can quote the address
        webhooks.emit(session, send.study_id, "reminder.failed",
                      {"reminder_id": str(send.id), "wave": send.wave, "kind": send.kind},
                      participant_id=send.participant_id)


def send_now(session: Session, study_id: uuid.UUID, participant_id: uuid.UUID, wave: str,
             now: datetime) -> ReminderSend:
    """A coordinator's "send a reminder now": one more message of the wave, due at `now`.

    It is an ordinary send row (kind `manual_<time>`), written in the caller's transaction and
    delivered by the next scan (the worker is nudged once it commits), so every rule holds:
    never to a withdrawn participant or a completed wave, only while the window is open and
    within sending hours (outside them it waits for the next morning), recorded once.
    """
    window = repository.window_of(session, participant_id, wave)
    if window is None:
        raise NotFound(f"the participant has no {wave!r} wave")
    if window.withdrawn_at is not None:
        raise Conflict("the participant has withdrawn; no message is ever sent to them")
    if window.completed_at is not None:
        raise Conflict(f"the {wave} response is already complete")
    if not window.opens_at <= now < window.closes_at:
        raise Conflict(f"the {wave} window is not open (it runs {window.opens_at:%Y-%m-%d} to "
                       f"{window.closes_at:%Y-%m-%d})")
    row = ReminderSend(id=uuid.uuid4(), study_id=study_id, participant_id=participant_id, wave=wave,
                       kind=f"manual_{now.astimezone(UTC):%Y%m%dT%H%M%S}", due_at=now, status="pending", attempts=0)
    session.add(row)
    session.flush()
    session.refresh(row)  # the database cancels it if a withdrawal or completion committed meanwhile
    return row


def set_policy(session: Session, study: Study, wave: str, policy: PolicyIn) -> Wave:
    """A wave's new reminder policy; every message not yet sent is planned again under it."""
    row = repository.wave(session, study.id, wave)
    if row is None:
        raise NotFound(f"no wave {wave!r} in study {study.key!r}")
    if any(d < 0 for d in policy.reminder_days_after_open):
        raise Invalid("reminder days must not be negative", errors=[
            {"loc": ["reminder_days_after_open"], "code": "range", "message": "days after opening are >= 0"}])
    row.reminder_policy = policy.model_dump()
    repository.replan_wave(session, study.id, wave)
    session.flush()
    return row


def set_template(session: Session, study: Study, subject: str, body: str) -> None:
    templates.validate(subject, body)
    study.settings = {**(study.settings or {}), "reminder_template": {"subject": subject, "body": body}}
    session.add(study)
    session.flush()


def not_yet_planned(session: Session, study_id: uuid.UUID, participant: Participant,
                    stored: list[ReminderSend]) -> list[tuple[str, str, datetime]]:
    """(wave, kind, due) of the messages the current policies will send in windows not planned yet."""
    if participant.withdrawn_at is not None:
        return []
    policies = {w.key: Policy.from_dict(w.reminder_policy) for w in repository.waves(session, study_id)}
    out = []
    for s in repository.unplanned_schedules(session, participant.id):
        if s.wave not in policies:
            continue
        kinds = {r.kind for r in stored if r.wave == s.wave}
        out += [(s.wave, kind, due) for kind, due in planned_sends(
            policies[s.wave], opens_at=s.opens_at, closes_at=s.closes_at, enrolled_at=participant.enrolled_at,
            zone_name=participant.timezone) if kind not in kinds]
    return out


def cancel_all(session: Session, participant_id: uuid.UUID, reason: str) -> None:
    """No message is ever sent to this participant again (a withdrawal)."""
    repository.cancel_pending(session, participant_id, reason)


# -- reading -----------------------------------------------------------------------------------


def participant_sends(session: Session, participant_id: uuid.UUID) -> list[ReminderSend]:
    return repository.of_participant(session, participant_id)


def funnel(session: Session, study_id: uuid.UUID, wave_keys: list[str], as_of: datetime,
           site_id: uuid.UUID | None = None) -> list[dict[str, Any]]:
    completed: dict[str, dict[str, int]] = defaultdict(dict)
    for wave, kind, n in repository.preceding_contact(session, study_id, as_of, site_id):
        completed[wave][kind] = n
    sent: dict[str, dict[str, int]] = defaultdict(dict)
    for wave, kind, n in repository.sent_counts(session, study_id, as_of, site_id):
        sent[wave][kind] = n
    out = []
    for wave in wave_keys:
        kinds = sorted(set(sent[wave]) | set(completed[wave]) - {"none"}, key=kind_rank)
        out.append({
            "wave": wave,
            "completed": sum(completed[wave].values()),
            "completed_after": {"none": completed[wave].get("none", 0),
                                **{k: completed[wave].get(k, 0) for k in kinds}},
            "sent": {k: sent[wave].get(k, 0) for k in kinds},
        })
    return out
