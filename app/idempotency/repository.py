from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, insert, text
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Executable

from app.core.db import with_commit
from app.idempotency.models import IdempotencyRecord

_keys = cast(Table, IdempotencyRecord.__table__)
# Built once: every creating POST with a key runs these.
# A server-side function (migration b7e2c91d4a60): the lock, then the read in a snapshot taken after it.
_CLAIM = text("SELECT * FROM cohort_idempotency_claim(:lock, :token, :key)")
_DROP = delete(_keys).where(_keys.c.id == bindparam("id"))
STORE = insert(_keys)  # public: app.responses.repository folds it with the response's writes


def claim_read(lock_id: int, token_id: uuid.UUID, key: str) -> tuple[Executable, dict[str, Any]]:
    """A transaction-scoped advisory lock on the key and, once locked, its stored reply: one row
    (locked, record_id, fingerprint, status_code, sealed_body, created_at), not `locked` when another
    transaction holds the key, `record_id` None when no reply is stored. A read to run at once, or
    whose parameters a first read that carries the claim takes (`app.responses.repository.opening_read`)."""
    return _CLAIM, {"lock": lock_id, "token": token_id, "key": key}


def drop(session: Session, record_id: uuid.UUID) -> None:
    session.connection().execute(_DROP, {"id": record_id})


def store(session: Session, values: dict[str, Any]) -> None:
    """Written with the commit: the record is never read back by the request that makes it."""
    with_commit(session, STORE, values)


def forget_resource(session: Session, resource_id: uuid.UUID) -> None:
    session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.resource_id == resource_id))


def purge_before(session: Session, before: datetime) -> int:
    result = session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < before))
    return int(getattr(result, "rowcount", 0) or 0)
