from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models import Base, created_at, uuid_pk


class Response(Base):
    """One participant's answers at one wave: raw answers as received, derived values beside them."""

    __tablename__ = "responses"
    __table_args__ = (
        UniqueConstraint("participant_id", "wave"),
        CheckConstraint("status IN ('partial', 'complete')", name="status"),
        CheckConstraint("status = 'partial' OR completed_at IS NOT NULL", name="complete_has_time"),
        Index("ix_responses_study_wave", "study_id", "wave", "status"),
        Index("ix_responses_study_received", "study_id", "received_at", "id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    study_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("studies.id", ondelete="CASCADE"), nullable=False
    )
    participant_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("participants.id", ondelete="CASCADE"), nullable=False
    )
    wave: Mapped[str] = mapped_column(String(63), nullable=False)
    status: Mapped[str] = mapped_column(String(10), nullable=False)
    answers: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    derived: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    derived_signature: Mapped[str] = mapped_column(String(32), nullable=False)
    codebook_revision: Mapped[int] = mapped_column(Integer, nullable=False)
    late: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # Instruments recorded complete one at a time (instrument -> when, RFC 3339); a complete
    # response has every instrument of its wave complete, whatever this holds.
    completed_instruments: Mapped[dict[str, str]] = mapped_column(
        JSONB, nullable=False, default=dict, server_default=text("'{}'::jsonb"))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    submitted_by: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)


class ResponseCorrection(Base):
    """A coordinator's correction of a completed response: why, by whom, the values before and after."""

    __tablename__ = "response_corrections"

    id: Mapped[uuid.UUID] = uuid_pk()
    response_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("responses.id", ondelete="CASCADE"), nullable=False, index=True
    )
    token_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    before: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    after: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = created_at()


class DerivedRecompute(Base):
    """Due work: a study whose stored derived values follow older definitions. Written in the
    transaction that installs the codebook revision; a periodic task claims it (SKIP LOCKED),
    recomputes in batches and deletes it, so a lost broker message loses nothing."""

    __tablename__ = "derived_recomputes"

    study_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True
    )
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
