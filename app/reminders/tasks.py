"""Celery entry points of the reminder pipeline, and the scan as an explicit sequence of units of work.

Each `with transaction(...)` below is one unit of work and the only place this pipeline commits
(the services only add and flush). The order is the one the service module's docstring
describes: release dead leases, plan windows, then claim due sends and deliver each outside any
transaction, recording the hand-over and the outcome in transactions of their own.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from celery import shared_task

from app.core.celery import task_database
from app.core.db import Database, transaction
from app.core.settings import Settings, get_settings
from app.core.timeutil import utcnow
from app.reminders import service
from app.reminders.mailer import Sender, open_sender
from app.reminders.service import Claim, ScanResult


def deliver(db: Database, settings: Settings, sender: Sender, claim: Claim, now: datetime, owner: uuid.UUID,
            lease: timedelta) -> str:
    """Send one claimed message and record what happened; returns sent, retry, failed or lost."""
    with transaction(db) as session:
        ours, email, problem = service.prepare(session, settings, claim, owner, lease)
    if not ours:
        return "lost"
    if email is None:
        outcome, values = "failed", {"status": "failed", "last_error": problem, "lease_expires_at": None}
    else:
        def handed_over() -> None:
            with transaction(db) as session:
                service.record_handover(session, claim.send_id, owner, now)

        error: Exception | None = None
        try:
            sender.send(email, handed_over)
        except Exception as exc:  # recorded as a retry or a failure, never left claimed
            error = exc
        outcome, values = service.outcome_of(claim, now, error)
    with transaction(db) as session:
        service.record_outcome(session, claim.send_id, owner, values)
    return outcome


def run_scan(db: Database, settings: Settings, now: datetime, *, study_id: uuid.UUID | None = None,
             actor: str | None = None) -> ScanResult:
    """One full scan at clock `now`: the beat task on the real clock, `reminders:run` on a given one."""
    total = ScanResult()
    owner = uuid.uuid4()
    lease = timedelta(seconds=settings.reminder_lease_seconds)
    with transaction(db, actor=actor) as session:
        service.release_expired_leases(session, utcnow())
    while True:
        with transaction(db, actor=actor) as session:
            planned = service.plan(session, now, study_id=study_id)
        total.planned += planned
        if planned == 0:
            break
    while True:
        with transaction(db, actor=actor) as session:
            claims, decided, seen = service.claim(session, now, owner=owner, study_id=study_id, lease=lease)
        total.add(decided)
        if claims:
            with open_sender(settings.smtp_url, settings.data_dir / "outbox", settings.mail_from) as sender:
                for c in claims:
                    outcome = deliver(db, settings, sender, c, now, owner, lease)
                    if outcome == "sent":
                        total.sent += 1
                    elif outcome == "retry":
                        total.retried += 1
                    elif outcome == "failed":
                        total.failed += 1
        if seen == 0:
            return total


@shared_task(name="cohort.reminders.scan", ignore_result=True, acks_late=True, soft_time_limit=240,
             time_limit=300)
def scan(now: str | None = None) -> dict[str, int]:
    """The periodic scan (beat, every minute) on the real clock; `now` only for operators' replays."""
    clock = datetime.fromisoformat(now) if now else utcnow()
    result = run_scan(task_database(), get_settings(), clock)
    return {k: getattr(result, k) for k in result.__dataclass_fields__}
