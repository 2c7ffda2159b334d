from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, String, UniqueConstraint
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models import Base, created_at, uuid_pk

SITE_KEY_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


class Site(Base):
    """A partition of a study (a recruiting organisation): each participant belongs to at most one."""

    __tablename__ = "sites"
    __table_args__ = (
        UniqueConstraint("study_id", "key"),
        CheckConstraint(f"key ~ '{SITE_KEY_PATTERN}'", name="key_format"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    study_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("studies.id", ondelete="CASCADE"), nullable=False
    )
    key: Mapped[str] = mapped_column(String(63), nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    timezone: Mapped[str | None] = mapped_column(String(64), nullable=True)  # participants' default, else the study's
    created_at: Mapped[datetime] = created_at()
