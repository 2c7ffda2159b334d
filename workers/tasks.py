from __future__ import annotations

import socket

from celery import shared_task

from app.core.celery import task_database
from app.core.db import transaction
from app.core.timeutil import utcnow
from app.health.service import record_heartbeat


@shared_task(name="cohort.ping", ignore_result=True)
def ping(queue: str = "reminders") -> str:
    """A round trip through broker, worker and database; leaves a heartbeat that /readyz reports."""
    with transaction(task_database()) as session:
        record_heartbeat(session, queue, socket.gethostname(), utcnow())
    return "pong"
