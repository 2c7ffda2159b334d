from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session


def sealed_count(session: Session, key: InstrumentedAttribute[Any], blob: InstrumentedAttribute[Any]) -> int:
    return session.scalar(select(func.count(key)).where(blob.is_not(None))) or 0


def sealed_batch(session: Session, key: InstrumentedAttribute[Any], blob: InstrumentedAttribute[Any],
                 after: Any, limit: int) -> Sequence[Any]:
    """The next `limit` (key, sealed value) rows after `after`, locked for re-sealing."""
    query = select(key, blob).where(blob.is_not(None)).order_by(key).limit(limit).with_for_update()
    if after is not None:
        query = query.where(key > after)
    return session.execute(query).all()


def reseal(session: Session, key: InstrumentedAttribute[Any], blob: InstrumentedAttribute[Any], row_key: Any,
           sealed: bytes) -> None:
    session.execute(update(key.class_).where(key == row_key).values({blob.key: sealed}))
