from __future__ import annotations

from datetime import timedelta

from celery import shared_task

from app.core.celery import task_database
from app.core.db import transaction
from app.core.timeutil import utcnow
from app.responses import service
from app.studies.service import study_key_of, system_context

LEASE = timedelta(minutes=10)


@shared_task(name="cohort.responses.recompute_derived", ignore_result=True, acks_late=True)
def recompute_derived() -> int:
    """Claim studies whose derived definitions changed and bring their stored rows up to date.

    Beat runs it every minute; a codebook revision also nudges it after its commit. Each step is
    its own transaction: claim a study (a lease), recompute a batch of participants at a time,
    then mark the study done. A worker that dies leaves the lease to run out, and another
    worker picks the study up again where it stopped (only stale rows are ever recomputed).
    """
    db = task_database()
    total = 0
    while True:
        started = utcnow()
        with transaction(db) as session:
            study_id = service.claim_recompute(session, started, LEASE)
        if study_id is None:
            return total
        while True:
            with transaction(db) as session:
                done = service.recompute_stale_derived(session, system_context(session, study_key_of(session,
                                                                                                      study_id)))
            total += done
            if done == 0:
                break
        with transaction(db) as session:
            service.finish_recompute(session, study_id, started)
