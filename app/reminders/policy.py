"""When each invitation and reminder of a wave is due: pure functions of the policy and the window.

Each send is due at 09:00 participant-local on its day, or at enrolment when that is later,
and is moved into sending hours (09:00-20:00 local). A send whose time falls after the
window closes is not planned. Kinds: `invitation` on the opening day, `reminder_1`,
`reminder_2`, ... on the days after opening, and `final` the given number of days before
the window's last day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

SEND_FROM = time(9, 0)
SEND_UNTIL = time(20, 0)


@dataclass(frozen=True)
class Policy:
    invite_on_open: bool = True
    reminder_days_after_open: tuple[int, ...] = ()
    final_days_before_close: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Policy:
        return cls(
            invite_on_open=bool(raw.get("invite_on_open", True)),
            reminder_days_after_open=tuple(sorted(int(d) for d in raw.get("reminder_days_after_open", []))),
            final_days_before_close=raw.get("final_days_before_close"),
        )

    def kinds(self) -> list[str]:
        out = ["invitation"] if self.invite_on_open else []
        out += [f"reminder_{i}" for i in range(1, len(self.reminder_days_after_open) + 1)]
        if self.final_days_before_close is not None:
            out.append("final")
        return out


def local_at(day: date, at: time, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, at, tzinfo=zone)


def in_sending_hours(at: datetime, zone: ZoneInfo) -> bool:
    local = at.astimezone(zone).time()
    return SEND_FROM <= local < SEND_UNTIL


def into_sending_hours(at: datetime, zone: ZoneInfo) -> datetime:
    """The first instant at or after `at` that falls within 09:00-20:00 local."""
    local = at.astimezone(zone)
    if local.time() < SEND_FROM:
        return local_at(local.date(), SEND_FROM, zone)
    if local.time() >= SEND_UNTIL:
        return local_at(local.date() + timedelta(days=1), SEND_FROM, zone)
    return at


def window_days(opens_at: datetime, closes_at: datetime, zone: ZoneInfo) -> tuple[date, date]:
    """The first and last local day of a window (closes_at is the midnight after the last day)."""
    return opens_at.astimezone(zone).date(), (closes_at - timedelta(microseconds=1)).astimezone(zone).date()


def planned_sends(
    policy: Policy, *, opens_at: datetime, closes_at: datetime, enrolled_at: datetime, zone_name: str
) -> list[tuple[str, datetime]]:
    zone = ZoneInfo(zone_name)
    first, last = window_days(opens_at, closes_at, zone)
    days: list[tuple[str, date]] = []
    if policy.invite_on_open:
        days.append(("invitation", first))
    for i, offset in enumerate(policy.reminder_days_after_open, start=1):
        days.append((f"reminder_{i}", first + timedelta(days=offset)))
    if policy.final_days_before_close is not None:
        days.append(("final", last - timedelta(days=policy.final_days_before_close)))
    out = []
    for kind, day in days:
        if day < first or day > last:
            continue
        due = into_sending_hours(max(local_at(day, SEND_FROM, zone), enrolled_at.astimezone(zone)), zone)
        if due < closes_at:
            out.append((kind, due))
    return out


RETRY_DELAYS = (timedelta(minutes=5), timedelta(minutes=30), timedelta(hours=2), timedelta(hours=6))
MAX_ATTEMPTS = len(RETRY_DELAYS) + 1


def retry_at(attempts: int, now: datetime, zone: ZoneInfo) -> datetime | None:
    """When to try a failed send again (exponential-ish backoff), or None once the cap is reached."""
    if attempts >= MAX_ATTEMPTS:
        return None
    return into_sending_hours(now + RETRY_DELAYS[attempts - 1], zone)
