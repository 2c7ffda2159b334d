from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models import Base, created_at, uuid_pk

STUDY_KEY_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (CheckConstraint(f"key ~ '{STUDY_KEY_PATTERN}'", name="key_format"),)

    id: Mapped[uuid.UUID] = uuid_pk()
    key: Mapped[str] = mapped_column(String(63), unique=True, nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    timezone: Mapped[str] = mapped_column(String(64), nullable=False)
    template: Mapped[str | None] = mapped_column(String(64), nullable=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    # Random per-study key of the pseudonyms in exports and analyses, sealed with the service key
    # (so rotating COHORT_SECRET_KEY does not change anyone's pseudonym).
    pseudonym_key: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # Random per-study key the date shifts of de-identified exports derive from, sealed the same way;
    # made on the first shifted export.
    date_shift_key: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = created_at()


class Wave(Base):
    __tablename__ = "waves"
    __table_args__ = (
        UniqueConstraint("study_id", "key"),
        CheckConstraint(
            "window_open_days <= offset_days AND offset_days <= window_close_days", name="window_order"
        ),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    study_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("studies.id", ondelete="CASCADE"), nullable=False
    )
    key: Mapped[str] = mapped_column(String(63), nullable=False)
    label: Mapped[str] = mapped_column(String(200), nullable=False)
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    offset_days: Mapped[int] = mapped_column(Integer, nullable=False)
    window_open_days: Mapped[int] = mapped_column(Integer, nullable=False)
    window_close_days: Mapped[int] = mapped_column(Integer, nullable=False)
    reminder_policy: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
