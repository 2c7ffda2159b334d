"""Wave windows of a participant, from `enrolled_at` and the wave offsets, in local days.

Day 0 is the local date of enrolment in the participant's time zone (the study's unless
the participant has their own). A window day runs from local midnight to local midnight,
so a window "day 168 to day 228, inclusive" is [midnight starting day 168, midnight ending
day 228). Instants are computed with zoneinfo and stored in UTC, so they stay right across
daylight-saving changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class WaveWindow:
    key: str
    offset_days: int
    window_open_days: int
    window_close_days: int


@dataclass(frozen=True)
class PlannedWindow:
    wave: str
    opens_at: datetime
    due_at: datetime
    closes_at: datetime

    def contains(self, at: datetime) -> bool:
        return self.opens_at <= at < self.closes_at


def local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def local_day(at: datetime, zone_name: str) -> date:
    return at.astimezone(ZoneInfo(zone_name)).date()


@lru_cache(maxsize=16384)
def windows_for_day(zone_name: str, day: date, waves: tuple[WaveWindow, ...]) -> tuple[PlannedWindow, ...]:
    """Cached: the participants of an import mostly share a handful of enrolment days."""
    zone = ZoneInfo(zone_name)
    return tuple(
        PlannedWindow(
            wave=w.key,
            opens_at=local_midnight(day + timedelta(days=w.window_open_days), zone),
            due_at=local_midnight(day + timedelta(days=w.offset_days), zone),
            closes_at=local_midnight(day + timedelta(days=w.window_close_days + 1), zone),
        )
        for w in waves
    )


def plan(enrolled_at: datetime, zone_name: str, waves: tuple[WaveWindow, ...]) -> tuple[PlannedWindow, ...]:
    return windows_for_day(zone_name, local_day(enrolled_at, zone_name), waves)


def status_at(
    *, opens_at: datetime, closes_at: datetime, completed_at: datetime | None, withdrawn_at: datetime | None,
    at: datetime,
) -> str:
    """The schedule status as it stood at `at` (the SQL twin is `repository.schedule_status_sql`)."""
    if completed_at is not None and completed_at <= at:
        return "completed"
    if withdrawn_at is not None and withdrawn_at <= at and withdrawn_at < closes_at:
        return "withdrawn"
    if at < opens_at:
        return "scheduled"
    if at < closes_at:
        return "open"
    return "missed"
