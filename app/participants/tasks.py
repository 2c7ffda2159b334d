from __future__ import annotations

from celery import shared_task

from app.core.celery import task_database
from app.core.db import transaction
from app.core.timeutil import utcnow
from app.participants import repository


@shared_task(name="cohort.reminders.advance_schedules", ignore_result=True)
def advance_schedules() -> dict[str, int]:
    """Keep the stored schedule statuses true as windows open and close (reads never depend on it)."""
    with transaction(task_database()) as session:
        opened, missed = repository.advance_schedules(session, utcnow())
    return {"opened": opened, "missed": missed}
