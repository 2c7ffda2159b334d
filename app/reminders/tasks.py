from __future__ import annotations

from celery import shared_task

from app.core.celery import task_database
from app.core.settings import get_settings
from app.core.timeutil import utcnow
from app.reminders import service


@shared_task(name="cohort.reminders.scan", ignore_result=True, acks_late=True, soft_time_limit=240,
             time_limit=300)
def scan(now: str | None = None) -> dict[str, int]:
    """The periodic scan (beat, every minute) on the real clock; `now` only for operators' replays."""
    from datetime import datetime

    clock = datetime.fromisoformat(now) if now else utcnow()
    result = service.scan(task_database(), get_settings(), clock)
    return {k: getattr(result, k) for k in result.__dataclass_fields__}
