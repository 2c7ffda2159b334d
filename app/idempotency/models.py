from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models import Base, created_at, uuid_pk


class IdempotencyRecord(Base):
    """The stored outcome of a creating POST, replayed for a retry with the same key and body.

    Written in the same transaction as the creation itself, so a key is recorded exactly
    when its effect is. The response body is sealed: it can hold contact data or a token.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("token_id", "key"), Index("ix_idempotency_keys_created_at", "created_at"))

    id: Mapped[uuid.UUID] = uuid_pk()
    token_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    key: Mapped[str] = mapped_column(String(255), nullable=False)
    method: Mapped[str] = mapped_column(String(10), nullable=False)
    path: Mapped[str] = mapped_column(String(500), nullable=False)
    fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    status_code: Mapped[int] = mapped_column(Integer, nullable=False)
    sealed_body: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    # what the request created, when the reply must be forgotten with it (an erased contact)
    resource_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), nullable=True, index=True)
    created_at: Mapped[datetime] = created_at()
