"""Time zones and instants: everything stored is UTC, participant-facing days are local."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from app.core.errors import Invalid


def zone(name: str, *, loc: list[str | int]) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise Invalid(
            f"unknown time zone {name!r}",
            errors=[{"loc": loc, "code": "timezone", "message": f"{name!r} is not an IANA time zone"}],
        ) from None


def utcnow() -> datetime:
    return datetime.now(UTC)
