"""The delivery loop: claim one due event, post it outside any transaction, record the outcome."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from datetime import timedelta

from celery import shared_task

from app.core.celery import task_database
from app.core.crypto import settings_sealer
from app.core.db import Database, transaction
from app.core.settings import Settings, get_settings
from app.core.timeutil import utcnow
from app.webhooks import sender, service


def lease_for(settings: Settings) -> timedelta:
    """Long enough for one attempt; a worker that dies mid-attempt frees its row when it runs out."""
    return timedelta(seconds=2 * settings.webhooks_timeout_seconds + 5)


def run_deliveries(db: Database, settings: Settings, *, limit: int = 1000,
                   budget_seconds: float = 50.0) -> dict[str, int]:
    """Deliver what is due now, one claim per transaction, until nothing is due or the budget is spent."""
    owner = uuid.uuid4()
    lease = lease_for(settings)
    sealer = settings_sealer(settings)
    retry_base = timedelta(seconds=settings.webhooks_retry_seconds)
    outcomes: Counter[str] = Counter()
    with transaction(db) as session:
        outcomes["released"] = service.release_expired(session, utcnow())
    stop_at = time.monotonic() + budget_seconds
    while sum(outcomes.values()) - outcomes["released"] < limit and time.monotonic() < stop_at:
        with transaction(db) as session:
            attempt = service.claim(session, utcnow(), owner, lease, sealer)
        if attempt is None:
            break
        code, error = sender.post(attempt.url, attempt.secret, attempt.msg_id, attempt.body,
                                  timeout=settings.webhooks_timeout_seconds,
                                  allow_loopback=settings.webhooks_allow_loopback)
        with transaction(db) as session:
            outcomes[service.record(session, attempt, owner, utcnow(), code=code, error=error,
                                    retry_base=retry_base)] += 1
    return dict(outcomes)


@shared_task(name="cohort.webhooks.deliver", ignore_result=True, acks_late=True, soft_time_limit=110,
             time_limit=120)
def deliver() -> dict[str, int]:
    """Beat runs it every few seconds (COHORT_WEBHOOKS_SCAN_SECONDS); runs may overlap safely."""
    return run_deliveries(task_database(), get_settings())
