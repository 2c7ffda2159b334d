from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models import Base, created_at, uuid_pk

ANALYSIS_STATUSES = ("queued", "running", "succeeded", "failed")


class Analysis(Base):
    """One model fit: the request, its state, and once done the data snapshot and the results."""

    __tablename__ = "analyses"
    __table_args__ = (
        CheckConstraint(f"status IN ({', '.join(repr(s) for s in ANALYSIS_STATUSES)})", name="status"),
        Index("ix_analyses_study_created", "study_id", "created_at"),
        Index("ix_analyses_reuse", "study_id", "model", "variant", "data_fingerprint"),
        Index("ix_analyses_queued", "created_at", postgresql_where="status = 'queued'"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    study_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("studies.id", ondelete="CASCADE"), nullable=False
    )
    model: Mapped[str] = mapped_column(String(40), nullable=False)
    variant: Mapped[str] = mapped_column(String(40), nullable=False, default="")
    # the plan version the model came from (null: fitted before plans, or a one-off spec) and the
    # resolved spec the worker fits, so a later plan change never alters a queued or past fit
    plan_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    as_of: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="queued")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    data_fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    snapshot_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    software: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    results: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    requested_by: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[datetime] = created_at()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Snapshot(Base):
    """The exact analysis frame a fit used (Parquet), kept so a result can be cited and re-checked."""

    __tablename__ = "analysis_snapshots"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("studies.id", ondelete="CASCADE"), nullable=False, index=True
    )
    rows: Mapped[int] = mapped_column(Integer, nullable=False)
    participants: Mapped[int] = mapped_column(Integer, nullable=False)
    parquet: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = created_at()
    # the data fingerprint (`service.data_fingerprint`) it was read at: a fit on unchanged data reuses it
    data_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # what the frame was read under (`service.frame_basis`: layout, codebook, as_of) and each row's
    # response id and version (Parquet): a read on the same basis after new data fetches only the rows
    # that changed and takes the rest from here
    basis: Mapped[str | None] = mapped_column(String(64), nullable=True)
    row_keys: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)

    __table_args__ = (Index("ix_analysis_snapshots_study_data_key", "study_id", "data_key"),)


class AnalysisPlan(Base):
    """One version of a study's analysis plan (a document, like the codebook); audited by trigger."""

    __tablename__ = "analysis_plans"
    __table_args__ = (
        UniqueConstraint("study_id", "version"),
        CheckConstraint("version >= 1", name="version"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    study_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("studies.id", ondelete="CASCADE"), nullable=False
    )
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    document: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_by: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    created_at: Mapped[datetime] = created_at()
