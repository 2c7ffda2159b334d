from __future__ import annotations

from celery import shared_task

from app.core.celery import task_database
from app.core.db import transaction
from app.responses.service import recompute_stale_derived
from app.studies.service import system_context


@shared_task(name="cohort.analysis.recompute_derived", ignore_result=True)
def recompute_derived(study_key: str) -> int:
    """After a codebook changes its derived definitions: bring every stored row up to date."""
    total = 0
    while True:
        with transaction(task_database()) as session:
            done = recompute_stale_derived(session, system_context(session, study_key))
        total += done
        if done == 0:
            return total
