from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.models import AuditEntry


def page(session: Session, *, study_id: uuid.UUID | None, table: str | None, action: str | None,
         actor: str | None, row_id: str | None, since: datetime | None, until: datetime | None,
         limit: int, before_id: int | None) -> list[AuditEntry]:
    """Newest first, `limit + 1` rows (the extra one says there is a next page); None filters nothing."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit + 1)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    for column, value in ((AuditEntry.study_id, study_id), (AuditEntry.table_name, table),
                          (AuditEntry.action, action), (AuditEntry.actor, actor), (AuditEntry.row_id, row_id)):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    if until is not None:
        query = query.where(AuditEntry.at < until)
    return list(session.scalars(query))
