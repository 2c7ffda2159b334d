"""All SQL of the analysis domain: jobs, snapshots, plan versions and the rows of the analysis frame
(add and flush only; the request and task wrappers commit)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, literal_column, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.analysis.models import Analysis, AnalysisPlan, Snapshot
from app.responses import table
from app.responses.models import Response
from app.studies.models import Study

LIVE = ("queued", "running", "succeeded")


def reusable(session: Session, study_id: uuid.UUID, model: str, variant: str, fingerprint: str) -> Analysis | None:
    found: Analysis | None = session.scalar(
        select(Analysis).where(Analysis.study_id == study_id, Analysis.model == model, Analysis.variant == variant,
                               Analysis.data_fingerprint == fingerprint, Analysis.status.in_(LIVE))
        .order_by(Analysis.created_at.desc()).limit(1)
    )
    return found


def add(session: Session, job: Analysis) -> Analysis:
    session.add(job)
    session.flush()
    return job


def with_study_key(session: Session, analysis_id: uuid.UUID) -> tuple[Analysis, str] | None:
    row = session.execute(
        select(Analysis, Study.key).join(Study, Study.id == Analysis.study_id).where(Analysis.id == analysis_id)
    ).one_or_none()
    return None if row is None else (row[0], row[1])


def page(session: Session, study_id: uuid.UUID, model: str | None, after: tuple[Any, ...] | None,
         limit: int) -> list[Analysis]:
    query = select(Analysis).where(Analysis.study_id == study_id)
    if model is not None:
        query = query.where(Analysis.model == model)
    if after is not None:
        query = query.where(tuple_(Analysis.created_at, Analysis.id) > tuple_(*after))
    return list(session.scalars(query.order_by(Analysis.created_at, Analysis.id).limit(limit + 1)))


def claim(session: Session, analysis_id: uuid.UUID, now: datetime) -> Any:
    """queued -> running, or None when the job is not queued (another worker has it, or it is done)."""
    return session.execute(
        update(Analysis).where(Analysis.id == analysis_id, Analysis.status == "queued")
        .values(status="running", started_at=now, attempts=Analysis.attempts + 1)
        .returning(Analysis.study_id, Analysis.model, Analysis.variant, Analysis.as_of, Analysis.spec)
    ).one_or_none()


def finish(session: Session, analysis_id: uuid.UUID, now: datetime, values: dict[str, Any]) -> Any:
    """The job's outcome; returns its study, model and variant (None if it is gone)."""
    return session.execute(update(Analysis).where(Analysis.id == analysis_id).values(finished_at=now, **values)
                           .returning(Analysis.study_id, Analysis.model, Analysis.variant)).one_or_none()


def study_key(session: Session, study_id: uuid.UUID) -> str | None:
    key: str | None = session.scalar(select(Study.key).where(Study.id == study_id))
    return key


def save_snapshot(session: Session, *, sha256: str, study_id: uuid.UUID, rows: int, participants: int,
                  parquet: bytes, now: datetime, data_key: str | None, basis: str | None = None,
                  row_keys: bytes | None = None) -> None:
    """Keep a frame; the same frame kept again takes the newer fingerprint, basis and row versions."""
    statement = insert(Snapshot).values(
        sha256=sha256, study_id=study_id, rows=rows, participants=participants, parquet=parquet, created_at=now,
        data_key=data_key, basis=basis, row_keys=row_keys)
    session.execute(statement.on_conflict_do_update(index_elements=[Snapshot.sha256], set_={
        "data_key": statement.excluded.data_key, "basis": statement.excluded.basis,
        "row_keys": statement.excluded.row_keys}))


def snapshot(session: Session, sha256: str) -> Snapshot | None:
    return session.get(Snapshot, sha256)


def succeeded_newest_first(session: Session, study_id: uuid.UUID) -> list[Analysis]:
    return list(session.scalars(select(Analysis).where(Analysis.study_id == study_id,
                                                       Analysis.status == "succeeded")
                                .order_by(Analysis.finished_at.desc())))


def fail_exhausted(session: Session, before: datetime, max_attempts: int, now: datetime,
                   error: str) -> Sequence[Any]:
    """Jobs whose worker stopped too often, failed; returns their ids, studies, models and variants."""
    return session.execute(
        update(Analysis).where(Analysis.status == "running", Analysis.started_at < before,
                               Analysis.attempts >= max_attempts)
        .values(status="failed", finished_at=now, error=error)
        .returning(Analysis.id, Analysis.study_id, Analysis.model, Analysis.variant)
    ).all()


def revive_expired(session: Session, before: datetime) -> int:
    revived = session.execute(
        update(Analysis).where(Analysis.status == "running", Analysis.started_at < before)
        .values(status="queued", started_at=None)
    )
    return int(getattr(revived, "rowcount", 0) or 0)


def queued_before(session: Session, before: datetime) -> list[uuid.UUID]:
    return list(session.scalars(select(Analysis.id).where(Analysis.status == "queued",
                                                          Analysis.created_at < before)))


def latest_plan(session: Session, study_id: uuid.UUID) -> AnalysisPlan | None:
    found: AnalysisPlan | None = session.scalar(
        select(AnalysisPlan).where(AnalysisPlan.study_id == study_id)
        .order_by(AnalysisPlan.version.desc()).limit(1))
    return found


def add_plan(session: Session, plan: AnalysisPlan) -> AnalysisPlan:
    session.add(plan)
    session.flush()
    return plan


def keep_first_plan(session: Session, study_id: uuid.UUID, document: dict[str, Any], now: datetime) -> None:
    """Store version 1 unless it is stored already (two first requests at once store it once)."""
    session.execute(insert(AnalysisPlan).values(
        id=uuid.uuid4(), study_id=study_id, version=1, document=document, created_by=None, created_at=now,
    ).on_conflict_do_nothing(index_elements=[AnalysisPlan.study_id, AnalysisPlan.version]))


def complete_digest(session: Session, study_id: uuid.UUID, as_of: datetime | None) -> tuple[int, int]:
    """How many complete responses, and the sum of their row versions (`table.ROW_VERSION`: a
    frame's keys sum to the same, so a worker holding them knows the fingerprint without asking)."""
    r = Response.__table__.alias("r")  # ROW_VERSION names the row `r`
    where = [r.c.study_id == study_id, r.c.status == "complete"]
    if as_of is not None:
        where.append(r.c.completed_at <= as_of)
    row: Any = session.execute(select(func.count(), func.coalesce(func.sum(literal_column(table.ROW_VERSION)), 0))
                          .select_from(r).where(*where)).one()
    return int(row[0]), int(row[1])


def snapshot_key_at(session: Session, study_id: uuid.UUID, data_key: str) -> str | None:
    """The sha256 of the snapshot read when the study's data had this fingerprint, if one was kept."""
    found: str | None = session.scalar(select(Snapshot.sha256).where(
        Snapshot.study_id == study_id, Snapshot.data_key == data_key).limit(1))
    return found


def newest_keyed_snapshot(session: Session, study_id: uuid.UUID, basis: str) -> str | None:
    """The newest snapshot of the study read on this basis that kept its rows' versions."""
    found: str | None = session.scalar(select(Snapshot.sha256).where(
        Snapshot.study_id == study_id, Snapshot.basis == basis, Snapshot.row_keys.is_not(None))
        .order_by(Snapshot.created_at.desc()).limit(1))
    return found


def snapshot_contents(session: Session, sha256: str) -> tuple[bytes, bytes | None] | None:
    """A snapshot's frame and row versions (Parquet)."""
    row = session.execute(select(Snapshot.parquet, Snapshot.row_keys).where(Snapshot.sha256 == sha256)).one_or_none()
    return None if row is None else (row[0], row[1])
