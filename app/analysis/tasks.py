"""Celery entry points of the analysis domain, and the transactions they own.

`run` is what a worker does with one job: claim it, read the frame (derived values
brought up to date first; the snapshot kept for unchanged data, or the last frame with the rows
that changed read again), fit it (outside any transaction: a fit can take seconds) while its
snapshot is stored beside, record the outcome; each step commits on its own, so a crash mid-fit
leaves the job `running` for the sweep to queue again.
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import timedelta
from typing import Any

from celery import shared_task

from app.analysis import service
from app.analysis.errors import ModelError
from app.core.celery import task_database
from app.core.db import Database, transaction
from app.core.settings import Settings, get_settings

log = logging.getLogger(__name__)


def run(db: Database, settings: Settings, analysis_id: uuid.UUID | str) -> str:
    """Fit one queued analysis; idempotent (a job that is not `queued` is left alone)."""
    job_id = uuid.UUID(str(analysis_id))
    with transaction(db) as session:
        job = service.claim(session, job_id)
    if job is None:
        return "not queued"
    outcome: dict[str, Any]
    try:
        with transaction(db) as session:
            prepared = service.prepare(session, settings, job)
        keeping = _keep.submit(_keep_snapshot, db, job, prepared)
        try:
            outcome = {"status": "succeeded", **service.fit(job, prepared.spec, prepared.frame)}
        except BaseException:
            wait([keeping])  # the fit's own error is the one to report, not the snapshot's
            raise
        service.cite(outcome, keeping.result())  # the result cites the snapshot: stored before the result
    except ModelError as exc:
        outcome = {"status": "failed", "error": str(exc)}
    except Exception as exc:
        log.exception("analysis %s crashed", job_id)
        outcome = {"status": "failed", "error": f"internal error while fitting ({type(exc).__name__})"}
    with transaction(db) as session:
        service.finish(session, job_id, outcome)
    return str(outcome["status"])


# A new frame's snapshot (its hash, Parquet, a row of up to megabytes) is made and stored while the
# model is fitted: hashing, Arrow and the database work mostly outside the GIL, so it overlaps the fit.
_keep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cohort-snapshot")


def _keep_snapshot(db: Database, job: service.Claim, prepared: service.Prepared) -> str:
    if prepared.sha is not None:
        return prepared.sha
    with transaction(db) as session:
        return service.store_snapshot(session, job, prepared)


def sweep(db: Database, lease: timedelta) -> dict[str, int]:
    with transaction(db) as session:
        stuck, revived = service.sweep(session, lease)
    for analysis_id in stuck:  # after the commit: never enqueue inside an open transaction
        run_analysis.delay(str(analysis_id))
    return {"requeued": len(stuck), "revived": revived}


@shared_task(name="cohort.analysis.run", ignore_result=True, acks_late=True)
def run_analysis(analysis_id: str) -> str:
    return run(task_database(), get_settings(), analysis_id)


@shared_task(name="cohort.analysis.sweep", ignore_result=True)
def sweep_analyses() -> dict[str, int]:
    return sweep(task_database(), timedelta(seconds=get_settings().analysis_lease_seconds))
