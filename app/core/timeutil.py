"""Time zones and instants: everything stored is UTC, participant-facing days are local."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, AwareDatetime

from app.core.errors import Invalid

# What the service computes with: windows a year ahead, local days in any zone. Instants far
# outside overflow that arithmetic, so every date a client sends is bounded to these years.
FIRST_YEAR, LAST_YEAR = 1900, 2199


def _in_range(value: date) -> None:
    if not FIRST_YEAR <= value.year <= LAST_YEAR:
        raise ValueError(f"must be between the years {FIRST_YEAR} and {LAST_YEAR}")


def _bounded_instant(value: datetime) -> datetime:
    _in_range(value)
    return value


def _bounded_day(value: date) -> date:
    _in_range(value)
    return value


Instant = Annotated[AwareDatetime, AfterValidator(_bounded_instant)]
"""An RFC 3339 instant with an offset, in the years the service can compute with."""
Day = Annotated[date, AfterValidator(_bounded_day)]


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
