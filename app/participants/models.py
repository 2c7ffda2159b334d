from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, Index, LargeBinary, String, Text, UniqueConstraint, text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models import Base, created_at, uuid_pk

PARTICIPANT_STATUSES = ("active", "withdrawn", "completed", "lost")
SCHEDULE_STATUSES = ("scheduled", "open", "completed", "missed", "withdrawn")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Participant(Base):
    __tablename__ = "participants"
    __table_args__ = (
        UniqueConstraint("study_id", "external_id"),
        CheckConstraint(_in("status", PARTICIPANT_STATUSES), name="status"),
        CheckConstraint("(status = 'withdrawn') = (withdrawn_at IS NOT NULL)", name="withdrawn_has_time"),
        Index("ix_participants_study_created", "study_id", "created_at", "id"),
        Index("ix_participants_site", "site_id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    study_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("studies.id", ondelete="CASCADE"), nullable=False
    )
    external_id: Mapped[str] = mapped_column(String(100), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="active")
    enrolled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    timezone: Mapped[str] = mapped_column(String(64), nullable=False)
    language: Mapped[str | None] = mapped_column(String(8), nullable=True)  # survey pages; else the study's
    # The study's site the participant belongs to (none in a study without sites); a site-scoped
    # token sees only its site's participants.
    site_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("sites.id", ondelete="RESTRICT"), nullable=True
    )
    withdrawn_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    withdraw_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = created_at()


class SiteMove(Base):
    """A participant moved from one site to another: who decided it is in the audit trail, why is here."""

    __tablename__ = "participant_site_moves"

    id: Mapped[uuid.UUID] = uuid_pk()
    study_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("studies.id", ondelete="CASCADE"), nullable=False
    )
    participant_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("participants.id", ondelete="CASCADE"), nullable=False, index=True
    )
    from_site_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("sites.id", ondelete="CASCADE"), nullable=True
    )
    to_site_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("sites.id", ondelete="CASCADE"), nullable=True
    )
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    moved_by: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    moved_at: Mapped[datetime] = created_at()


class Contact(Base):
    """Contact details, kept apart from answers and sealed (AES-GCM) with the service key."""

    __tablename__ = "participant_contacts"

    participant_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("participants.id", ondelete="CASCADE"), primary_key=True
    )
    sealed: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    updated_at: Mapped[datetime] = created_at()


class Schedule(Base):
    """One participant's window for one wave; status is kept as responses arrive and time passes."""

    __tablename__ = "schedules"
    __table_args__ = (
        UniqueConstraint("participant_id", "wave"),
        CheckConstraint(_in("status", SCHEDULE_STATUSES), name="status"),
        CheckConstraint("opens_at <= due_at AND due_at < closes_at", name="window_order"),
        Index("ix_schedules_study_wave_status", "study_id", "wave", "status"),
        Index("ix_schedules_pending_transition", "closes_at", postgresql_where=text("status IN ('scheduled', 'open')")),
        Index("ix_schedules_unplanned", "opens_at",
              postgresql_where=text("reminders_planned_at IS NULL AND completed_at IS NULL")),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    study_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("studies.id", ondelete="CASCADE"), nullable=False
    )
    participant_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("participants.id", ondelete="CASCADE"), nullable=False
    )
    wave: Mapped[str] = mapped_column(String(63), nullable=False)
    opens_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    closes_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Set once this window's invitation and reminders exist as rows in reminder_sends.
    reminders_planned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
