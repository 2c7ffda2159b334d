from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.health.models import WorkerHeartbeat


def record_heartbeat(session: Session, queue: str, hostname: str, at: datetime) -> None:
    stmt = insert(WorkerHeartbeat).values(queue=queue, hostname=hostname, seen_at=at)
    stmt = stmt.on_conflict_do_update(index_elements=[WorkerHeartbeat.queue],
                                      set_={"hostname": hostname, "seen_at": at})
    session.execute(stmt)


def heartbeats(session: Session) -> dict[str, datetime]:
    return {hb.queue: hb.seen_at for hb in session.scalars(select(WorkerHeartbeat))}
