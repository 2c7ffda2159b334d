"""Cursor pagination: `?limit=` (max 500) and an opaque `?cursor=`; bodies are `{items, next_cursor}`."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel

from app.core.errors import Malformed

T = TypeVar("T")

MAX_LIMIT = 500


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


LimitQuery = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="page size (at most 500)")]
CursorQuery = Annotated[str | None, Query(max_length=1000, description="next_cursor of the previous page")]


def encode_cursor(*values: Any) -> str:
    raw = json.dumps([str(v) if not isinstance(v, int | float | str) else v for v in values])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, arity: int) -> list[Any] | None:
    if cursor is None:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()).decode())
    except ValueError:
        raise Malformed("the cursor is not one this service issued") from None
    if not isinstance(values, list) or len(values) != arity:
        raise Malformed("the cursor is not one this service issued")
    return values


def page_of(rows: list[T], limit: int, key: Any) -> Page[T]:
    """`rows` were fetched with limit + 1; the extra row only says whether another page exists."""
    if len(rows) > limit:
        rows = rows[:limit]
        return Page(items=rows, next_cursor=encode_cursor(*key(rows[-1])))
    return Page(items=rows, next_cursor=None)


def decode_time_id(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    """The common cursor: (created_at, id) of the last row of the previous page."""
    values = decode_cursor(cursor, 2)
    if values is None:
        return None
    try:
        return datetime.fromisoformat(str(values[0])), uuid.UUID(str(values[1]))
    except ValueError:
        raise Malformed("the cursor is not one this service issued") from None


def time_id_key(row: Any) -> tuple[str, str]:
    return row.created_at.isoformat(), str(row.id)
