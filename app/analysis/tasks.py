from __future__ import annotations

import uuid
from datetime import timedelta

from celery import shared_task

from app.analysis import service
from app.core.celery import task_database
from app.core.settings import get_settings


@shared_task(name="cohort.analysis.run", ignore_result=True, acks_late=True)
def run_analysis(analysis_id: str) -> str:
    return service.run(task_database(), get_settings(), uuid.UUID(analysis_id))


@shared_task(name="cohort.analysis.sweep", ignore_result=True)
def sweep_analyses() -> dict[str, int]:
    return service.sweep(task_database(), timedelta(seconds=get_settings().analysis_lease_seconds))
