from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models import Base


class WorkerHeartbeat(Base):
    """The last time a worker consumed the ping task from each queue (shown by /readyz)."""

    __tablename__ = "worker_heartbeats"

    queue: Mapped[str] = mapped_column(String(50), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(200), nullable=False)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
