from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from app.participants.schedule import WaveWindow, plan
from app.reminders.policy import Policy, in_sending_hours, into_sending_hours, planned_sends, retry_at
from tests.factories import pal_codebook

DOC = pal_codebook()
POLICY = Policy.from_dict(DOC["reminder_policy"])
WAVES = tuple(WaveWindow(w["key"], w["offset_days"], w["window_open_days"], w["window_close_days"])
              for w in DOC["waves"])
NY = ZoneInfo("America/New_York")


def sends(enrolled: datetime, zone: str = "America/New_York") -> dict[str, dict[str, datetime]]:
    out = {}
    for w in plan(enrolled, zone, WAVES):
        out[w.wave] = dict(planned_sends(POLICY, opens_at=w.opens_at, closes_at=w.closes_at, enrolled_at=enrolled,
                                         zone_name=zone))
    return out


def test_the_pal_policy_gives_four_messages_per_wave() -> None:
    enrolled = datetime(2026, 3, 2, 15, 0, tzinfo=NY)  # a Monday, 15:00 local
    planned = sends(enrolled)
    day0 = enrolled.date()
    assert planned["baseline"] == {
        "invitation": enrolled,  # later than 09:00 and within sending hours: at enrolment
        "reminder_1": datetime.combine(day0 + timedelta(days=7), time(9), tzinfo=NY),
        "reminder_2": datetime.combine(day0 + timedelta(days=14), time(9), tzinfo=NY),
        "final": datetime.combine(day0 + timedelta(days=30 - 3), time(9), tzinfo=NY),
    }
    assert planned["month6"] == {
        "invitation": datetime.combine(day0 + timedelta(days=168), time(9), tzinfo=NY),
        "reminder_1": datetime.combine(day0 + timedelta(days=175), time(9), tzinfo=NY),
        "reminder_2": datetime.combine(day0 + timedelta(days=182), time(9), tzinfo=NY),
        "final": datetime.combine(day0 + timedelta(days=228 - 3), time(9), tzinfo=NY),
    }
    for when in (*planned["month6"].values(), *planned["month12"].values()):
        assert when.astimezone(NY).time() == time(9)  # 09:00 local on both sides of DST changes


def test_enrolment_outside_sending_hours_moves_the_invitation() -> None:
    late = datetime(2026, 3, 2, 22, 30, tzinfo=NY)
    assert sends(late)["baseline"]["invitation"] == datetime(2026, 3, 3, 9, 0, tzinfo=NY)
    early = datetime(2026, 3, 2, 6, 0, tzinfo=NY)
    assert sends(early)["baseline"]["invitation"] == datetime(2026, 3, 2, 9, 0, tzinfo=NY)


def test_far_time_zone_uses_its_own_mornings() -> None:
    enrolled = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    planned = sends(enrolled, "Pacific/Auckland")["month6"]
    auckland = ZoneInfo("Pacific/Auckland")
    assert all(t.astimezone(auckland).time() == time(9) for t in planned.values())
    assert planned["invitation"].utcoffset() is not None


def test_sending_hours_and_retries() -> None:
    assert into_sending_hours(datetime(2026, 3, 2, 20, 0, tzinfo=NY), NY) == datetime(2026, 3, 3, 9, tzinfo=NY)
    assert into_sending_hours(datetime(2026, 3, 2, 19, 59, tzinfo=NY), NY) == datetime(2026, 3, 2, 19, 59, tzinfo=NY)
    now = datetime(2026, 3, 2, 12, 0, tzinfo=NY)
    assert retry_at(1, now, NY) == now + timedelta(minutes=5)
    assert retry_at(4, now, NY) == now + timedelta(hours=6)
    assert retry_at(5, now, NY) is None


def test_a_policy_without_reminders_and_a_short_window() -> None:
    policy = Policy.from_dict({"invite_on_open": True, "reminder_days_after_open": [40],
                               "final_days_before_close": 3})
    opens = datetime(2026, 3, 2, 0, 0, tzinfo=NY)
    closes = datetime(2026, 3, 4, 0, 0, tzinfo=NY)  # a two-day window
    planned = dict(planned_sends(policy, opens_at=opens, closes_at=closes, enrolled_at=opens - timedelta(days=9),
                                 zone_name="America/New_York"))
    assert planned == {"invitation": datetime(2026, 3, 2, 9, tzinfo=NY)}  # reminder and final fall outside


@pytest.mark.parametrize("zone", ["America/New_York", "Europe/London", "Asia/Kolkata", "Pacific/Auckland",
                                  "Australia/Lord_Howe", "UTC"])
def test_the_claim_query_keeps_the_policys_sending_hours(connection: Any, zone: str) -> None:
    """The claim decides in SQL; its sending hours are the policy's, through DST changes too."""
    from sqlalchemy.orm import Session

    from app.reminders.repository import sending_hours

    session = Session(bind=connection)
    start = datetime(2026, 3, 7, tzinfo=UTC)  # spans the March changes of both hemispheres
    for step in range(0, 24 * 60 * 40, 97):  # every 97 minutes for 40 days
        now = start + timedelta(minutes=step)
        inside, later = sending_hours(session, now, zone)
        assert inside == in_sending_hours(now, ZoneInfo(zone)), now
        if not inside:
            assert later == into_sending_hours(now, ZoneInfo(zone)), now
