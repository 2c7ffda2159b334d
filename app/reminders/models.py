from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    FetchedValue,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models import Base, uuid_pk
from app.core.models import created_at as timestamp

SEND_STATUSES = ("pending", "sending", "handed_over", "sent", "failed", "cancelled", "skipped")


class ReminderSend(Base):
    """One planned message to one participant for one wave: the row is the claim, the record and the lock.

    Unique per (participant, wave, kind), so a message is decided once whatever the number of
    schedulers. `sending` is a lease: a crashed worker's claims go back to `pending` when it expires.
    `handed_over` is written just before the mail server is told to accept the message: a lease
    that expires there means the server has it, so it is recorded as sent, not sent again.
    """

    __tablename__ = "reminder_sends"
    __table_args__ = (
        UniqueConstraint("participant_id", "wave", "kind"),
        CheckConstraint(f"status IN ({', '.join(repr(s) for s in SEND_STATUSES)})", name="status"),
        Index("ix_reminder_sends_due", "due_at", postgresql_where=text("status = 'pending'")),
        Index("ix_reminder_sends_lease", "lease_expires_at", postgresql_where=text("status = 'sending'")),
        Index("ix_reminder_sends_study_wave", "study_id", "wave", "status"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    study_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("studies.id", ondelete="CASCADE"), nullable=False
    )
    participant_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("participants.id", ondelete="CASCADE"), nullable=False
    )
    wave: Mapped[str] = mapped_column(String(63), nullable=False)
    kind: Mapped[str] = mapped_column(String(30), nullable=False)
    due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    claimed_by: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Copies of the window's close and the participant's zone, so the claim reads this row alone.
    # The database fills them when the row is written and keeps them (see the migration
    # 9b3e5d7f1a24), as it keeps the invariant the claim relies on: a pending send's participant
    # has not withdrawn and its window is not complete.
    closes_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                                server_default=FetchedValue())
    timezone: Mapped[str] = mapped_column(String(64), nullable=False, server_default=FetchedValue())
    created_at: Mapped[datetime] = timestamp()
    updated_at: Mapped[datetime] = timestamp()
