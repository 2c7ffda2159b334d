from __future__ import annotations

from celery import shared_task

from app.core.celery import task_database
from app.core.db import transaction
from app.core.timeutil import utcnow
from app.idempotency.service import purge_expired


@shared_task(name="cohort.reminders.purge_idempotency_keys", ignore_result=True)
def purge_idempotency_keys() -> int:
    with transaction(task_database()) as session:
        return purge_expired(session, utcnow())
