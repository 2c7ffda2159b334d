"""Analysis jobs: requested by the API (202), fitted by a Celery task on the `analysis` queue.

A request on data that has not changed since an identical request (same model, variant,
as_of and data fingerprint) returns that job instead of queueing another; the same snapshot
and model always give the same numbers.
"""

from __future__ import annotations

import logging
import platform
import uuid
from datetime import datetime, timedelta
from importlib import metadata
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.analysis.errors import ModelError
from app.analysis.models import Analysis, Snapshot
from app.core.crypto import settings_sealer
from app.core.db import Database, on_commit, transaction
from app.core.errors import Invalid, NotFound
from app.core.settings import Settings
from app.core.timeutil import utcnow
from app.studies.models import Study
from app.studies.service import StudyContext, pseudonymiser, system_context
from app.webhooks import service as webhooks

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


def software() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("statsmodels", "pandas", "numpy", "scipy", "cohort"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def request(session: Session, ctx: StudyContext, *, model: str, variant: str | None, as_of: datetime | None,
            requested_by: uuid.UUID) -> tuple[Analysis, bool]:
    from app.analysis import frame as frames

    codebook = ctx.require_codebook()
    if variant is not None and model != "abstinence":
        raise Invalid("only the abstinence model has variants", errors=[
            {"loc": ["variant"], "code": "not_allowed", "message": f"{model} takes no variant"}])
    variant_key = "model2" if variant == "model2" else ("model1" if model == "abstinence" else "")
    fingerprint = frames.data_fingerprint(session, ctx.study.id, codebook, ctx.revision, as_of)
    existing = session.scalar(
        select(Analysis).where(Analysis.study_id == ctx.study.id, Analysis.model == model,
                               Analysis.variant == variant_key, Analysis.data_fingerprint == fingerprint,
                               Analysis.status.in_(("queued", "running", "succeeded")))
        .order_by(Analysis.created_at.desc()).limit(1)
    )
    if existing is not None:
        return existing, True
    job = Analysis(study_id=ctx.study.id, model=model, variant=variant_key, as_of=as_of, status="queued",
                   data_fingerprint=fingerprint, requested_by=requested_by, created_at=utcnow())
    session.add(job)
    session.flush()
    job_id = str(job.id)
    on_commit(session, lambda: enqueue(job_id))
    return job, False


def enqueue(analysis_id: str) -> None:
    from app.analysis.tasks import run_analysis

    run_analysis.delay(analysis_id)


def get(session: Session, analysis_id: uuid.UUID) -> tuple[Analysis, str]:
    row = session.execute(
        select(Analysis, Study.key).join(Study, Study.id == Analysis.study_id).where(Analysis.id == analysis_id)
    ).one_or_none()
    if row is None:
        raise NotFound(f"no analysis {analysis_id}")
    return row[0], row[1]


def run(db: Database, settings: Settings, analysis_id: uuid.UUID) -> str:
    """Fit one queued analysis; idempotent (a job that is not `queued` is left alone)."""
    with transaction(db) as session:
        claimed = session.execute(
            update(Analysis).where(Analysis.id == analysis_id, Analysis.status == "queued")
            .values(status="running", started_at=utcnow(), attempts=Analysis.attempts + 1)
            .returning(Analysis.study_id, Analysis.model, Analysis.variant, Analysis.as_of)
        ).one_or_none()
    if claimed is None:
        return "not queued"
    study_id, model, variant, as_of = claimed
    try:
        outcome = _fit(db, settings, study_id, model, variant or None, as_of)
    except ModelError as exc:
        _finish(db, analysis_id, status="failed", error=str(exc))
        return "failed"
    except Exception as exc:
        log.exception("analysis %s crashed", analysis_id)
        _finish(db, analysis_id, status="failed", error=f"internal error while fitting ({type(exc).__name__})")
        return "failed"
    _finish(db, analysis_id, status="succeeded", **outcome)
    return "succeeded"


def _fit(db: Database, settings: Settings, study_id: uuid.UUID, model: str, variant: str | None,
         as_of: datetime | None) -> dict[str, Any]:
    # pandas and statsmodels are imported here, in the worker, not by every API process
    from app.analysis import frame as frames
    from app.analysis.stats import run_model

    taken_at = as_of or utcnow()
    with transaction(db) as session:
        key = session.scalar(select(Study.key).where(Study.id == study_id))
        assert key is not None
        ctx = system_context(session, key)
        pseudonymise = pseudonymiser(session, ctx.study, settings_sealer(settings))
        frame = frames.load(session, study_id, ctx.require_codebook(), pseudonymise, as_of=as_of)
    sha = frames.snapshot_sha256(frame)
    with transaction(db) as session:
        session.execute(insert(Snapshot).values(
            sha256=sha, study_id=study_id, rows=len(frame), participants=int(frame["participant"].nunique()),
            parquet=frames.to_parquet(frame), created_at=utcnow(),
        ).on_conflict_do_nothing(index_elements=[Snapshot.sha256]))
    if frame.empty:
        raise ModelError("there are no complete responses to analyse yet")
    results = run_model(model, variant, frame)
    return {
        "snapshot_sha256": sha,
        "data": {"n_participants": int(frame["participant"].nunique()), "n_observations": len(frame),
                 "snapshot_sha256": sha, "as_of": taken_at.isoformat()},
        "software": software(),
        "results": results,
    }


def _finish(db: Database, analysis_id: uuid.UUID, **values: Any) -> None:
    with transaction(db) as session:
        row = session.execute(update(Analysis).where(Analysis.id == analysis_id)
                              .values(finished_at=utcnow(), **values)
                              .returning(Analysis.study_id, Analysis.model, Analysis.variant)).one_or_none()
        if row is not None:
            webhooks.emit(session, row.study_id,
                          "analysis.succeeded" if values.get("status") == "succeeded" else "analysis.failed",
                          {"analysis_id": str(analysis_id), "model": row.model, "variant": row.variant})


def latest_succeeded(session: Session, study_id: uuid.UUID) -> dict[tuple[str, str], Analysis]:
    """The newest succeeded fit of each (model, variant) of a study."""
    rows = session.scalars(select(Analysis).where(Analysis.study_id == study_id, Analysis.status == "succeeded")
                           .order_by(Analysis.finished_at.desc()))
    latest: dict[tuple[str, str], Analysis] = {}
    for row in rows:
        latest.setdefault((row.model, row.variant or ""), row)
    return latest


def snapshot(session: Session, sha256: str) -> Snapshot:
    found = session.get(Snapshot, sha256)
    if found is None:
        raise NotFound("the data snapshot of this analysis is not stored")
    return found


def sweep(db: Database, lease: timedelta) -> dict[str, int]:
    """Jobs the broker lost (down at commit, or restarted empty) are sent again; jobs whose worker
    died mid-fit (running past the lease) are queued again, up to MAX_ATTEMPTS, then failed with a
    message. The claim (queued -> running) keeps every job to one fit at a time."""
    now = utcnow()
    with transaction(db) as session:
        given_up = session.execute(
            update(Analysis).where(Analysis.status == "running", Analysis.started_at < now - lease,
                                   Analysis.attempts >= MAX_ATTEMPTS)
            .values(status="failed", finished_at=now,
                    error=f"the worker stopped during the fit {MAX_ATTEMPTS} times; request it again")
            .returning(Analysis.id, Analysis.study_id, Analysis.model, Analysis.variant)
        ).all()
        for row in given_up:
            webhooks.emit(session, row.study_id, "analysis.failed",
                          {"analysis_id": str(row.id), "model": row.model, "variant": row.variant})
        revived = session.execute(
            update(Analysis).where(Analysis.status == "running", Analysis.started_at < now - lease)
            .values(status="queued", started_at=None)
        )
        stuck = list(session.scalars(select(Analysis.id).where(
            Analysis.status == "queued", Analysis.created_at < now - min(lease, timedelta(minutes=2)))))
    for analysis_id in stuck:
        enqueue(str(analysis_id))
    return {"requeued": len(stuck), "revived": int(getattr(revived, "rowcount", 0) or 0)}
