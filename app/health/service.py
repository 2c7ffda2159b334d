from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from app.health import repository


def record_heartbeat(session: Session, queue: str, hostname: str, at: datetime) -> None:
    repository.record_heartbeat(session, queue, hostname, at)


def heartbeats(session: Session) -> dict[str, datetime]:
    """Each queue's last heartbeat; reading them also proves the database answers."""
    return repository.heartbeats(session)
