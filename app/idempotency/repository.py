from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select
from sqlalchemy.orm import Session

from app.core.db import with_commit
from app.idempotency.models import IdempotencyRecord

_keys = cast(Table, IdempotencyRecord.__table__)
# Built once: every creating POST with a key runs these.
_TRY_LOCK = select(func.pg_try_advisory_xact_lock(bindparam("k")))
_RECORD = select(IdempotencyRecord).where(IdempotencyRecord.token_id == bindparam("t"),
                                          IdempotencyRecord.key == bindparam("k"))
_STORE = insert(_keys)


def try_lock(session: Session, lock_id: int) -> bool:
    """A transaction-scoped advisory lock on the key, or False if another transaction holds it."""
    return bool(session.connection().execute(_TRY_LOCK, {"k": lock_id}).scalar())


def record(session: Session, token_id: uuid.UUID, key: str) -> IdempotencyRecord | None:
    return session.scalar(_RECORD, {"t": token_id, "k": key})


def drop(session: Session, row: IdempotencyRecord) -> None:
    session.delete(row)
    session.flush()


def store(session: Session, values: dict[str, Any]) -> None:
    """Written with the commit: the record is never read back by the request that makes it."""
    with_commit(session, _STORE, values)


def forget_resource(session: Session, resource_id: uuid.UUID) -> None:
    session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.resource_id == resource_id))


def purge_before(session: Session, before: datetime) -> int:
    result = session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < before))
    return int(getattr(result, "rowcount", 0) or 0)
