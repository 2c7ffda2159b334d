from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Identity, Index, String, func
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models import Base

# Tables whose every change is written to the audit trail by database triggers (see the
# migration that creates them): (table, primary key column, redacted columns, how to find the study)
AUDITED = (
    ("studies", "id", (), "self"),
    ("codebooks", "id", (), "column"),
    ("waves", "id", (), "column"),
    ("api_tokens", "id", ("secret_hash",), "column"),
    ("participants", "id", (), "column"),
    ("participant_contacts", "participant_id", ("sealed",), "participant"),
    ("schedules", "id", (), "column"),
    ("responses", "id", (), "column"),
    ("response_corrections", "id", (), "response"),
    ("reminder_sends", "id", (), "column"),
    ("analysis_plans", "id", (), "column"),
    ("sites", "id", (), "column"),
    ("participant_site_moves", "id", (), "column"),
)


class AuditEntry(Base):
    """Append-only: written only by triggers; UPDATE, DELETE and TRUNCATE are refused by a trigger."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_study", "study_id", "id"),
        Index("ix_audit_log_row", "table_name", "row_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    actor: Mapped[str | None] = mapped_column(String(64), nullable=True)
    txid: Mapped[int] = mapped_column(BigInteger, nullable=False)
    table_name: Mapped[str] = mapped_column(String(63), nullable=False)
    row_id: Mapped[str] = mapped_column(String(64), nullable=False)
    action: Mapped[str] = mapped_column(String(10), nullable=False)
    study_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True)
    changed: Mapped[list[str] | None] = mapped_column(JSONB, nullable=True)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONB, nullable=True)
