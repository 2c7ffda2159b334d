from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import Connection, text

from tests.conftest import ADMIN_TOKEN
from tests.factories import auth, create_study, create_token

pytestmark = pytest.mark.anyio

WINDOWS = {"baseline": (0, 0, 30), "month6": (182, 168, 228), "month12": (365, 351, 411)}


def expected_schedule(enrolled_at: datetime, zone: str) -> dict[str, tuple[datetime, datetime, datetime]]:
    """Computed here independently: local midnights of the window days, as UTC instants."""
    tz = ZoneInfo(zone)
    day0 = enrolled_at.astimezone(tz).date()

    def midnight(d: date) -> datetime:
        return datetime.combine(d, time(0), tzinfo=tz).astimezone(UTC)

    return {
        wave: (midnight(day0 + timedelta(days=o)), midnight(day0 + timedelta(days=off)),
               midnight(day0 + timedelta(days=c + 1)))
        for wave, (off, o, c) in WINDOWS.items()
    }


def as_tuple(schedule: list[dict[str, Any]]) -> dict[str, tuple[datetime, datetime, datetime]]:
    return {s["wave"]: (datetime.fromisoformat(s["opens_at"]), datetime.fromisoformat(s["due_at"]),
                        datetime.fromisoformat(s["closes_at"])) for s in schedule}


@pytest.fixture
async def coordinator(admin: httpx.AsyncClient) -> str:
    await create_study(admin, ADMIN_TOKEN, key="pal", timezone="America/New_York")
    return await create_token(admin, ADMIN_TOKEN, "coordinator")


async def enrol(client: httpx.AsyncClient, token: str, external_id: str, enrolled_at: datetime,
                **extra: Any) -> httpx.Response:
    body = {"external_id": external_id, "enrolled_at": enrolled_at.isoformat(), **extra}
    return await client.post("/api/v1/studies/pal/participants", json=body, headers=auth(token))


async def test_enrol_returns_the_schedule_and_contact(app_client: httpx.AsyncClient, coordinator: str) -> None:
    enrolled = datetime.now(UTC) - timedelta(days=3)
    r = await enrol(app_client, coordinator, "P0001", enrolled, contact={"email": "p1@example.org", "name": "Ana"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["location"] == "/api/v1/studies/pal/participants/P0001"
    assert body["status"] == "active" and body["timezone"] == "America/New_York"
    assert body["contact"] == {"email": "p1@example.org", "phone": None, "name": "Ana"}
    assert as_tuple(body["schedule"]) == expected_schedule(enrolled, "America/New_York")
    statuses = {s["wave"]: s["status"] for s in body["schedule"]}
    assert statuses == {"baseline": "open", "month6": "scheduled", "month12": "scheduled"}
    got = (await app_client.get("/api/v1/studies/pal/participants/P0001", headers=auth(coordinator))).json()
    assert got == body


async def test_schedule_across_a_dst_change(app_client: httpx.AsyncClient, coordinator: str) -> None:
    # enrolled in winter (UTC-5); the month6 and month12 windows open in summer time (UTC-4) or back
    enrolled = datetime(2026, 1, 20, 15, 30, tzinfo=UTC)
    body = (await enrol(app_client, coordinator, "DST1", enrolled)).json()
    schedule = as_tuple(body["schedule"])
    assert schedule == expected_schedule(enrolled, "America/New_York")
    ny = ZoneInfo("America/New_York")
    for opens, due, closes in schedule.values():
        for instant in (opens, due, closes):
            assert instant.astimezone(ny).time() == time(0)  # local midnight, whatever the offset
    assert schedule["baseline"][0].utcoffset() == timedelta(0)
    assert schedule["baseline"][0].hour == 5 and schedule["month6"][0].hour == 4  # EST then EDT
    # a window of 61 local days is not 61 x 24 h when a DST change falls inside it
    enrolled2 = datetime(2026, 9, 10, 12, tzinfo=UTC)
    body2 = (await enrol(app_client, coordinator, "DST2", enrolled2)).json()
    opens, _, closes = as_tuple(body2["schedule"])["baseline"]
    assert closes - opens == timedelta(days=31)
    opens6, _, closes6 = as_tuple(body2["schedule"])["month6"]
    assert closes6 - opens6 == timedelta(days=61) - timedelta(hours=1)  # 25 Feb to 27 Apr 2027: spring forward


async def test_a_participant_far_from_the_study_gets_their_own_local_days(
    app_client: httpx.AsyncClient, coordinator: str
) -> None:
    enrolled = datetime(2026, 3, 1, 20, 0, tzinfo=UTC)  # already 2 March in Auckland, still 1 March in New York
    body = (await enrol(app_client, coordinator, "NZ1", enrolled, timezone="Pacific/Auckland")).json()
    assert body["timezone"] == "Pacific/Auckland"
    schedule = as_tuple(body["schedule"])
    assert schedule == expected_schedule(enrolled, "Pacific/Auckland")
    auckland = ZoneInfo("Pacific/Auckland")
    assert schedule["baseline"][0].astimezone(auckland) == datetime(2026, 3, 2, tzinfo=auckland)
    assert schedule["baseline"][0] != expected_schedule(enrolled, "America/New_York")["baseline"][0]


@pytest.mark.parametrize(("body", "loc"), [
    ({"external_id": "X1", "enrolled_at": "2026-01-01T10:00:00"}, ["enrolled_at"]),
    ({"external_id": "X1", "enrolled_at": "2026-01-01T10:00:00Z", "timezone": "Nowhere/City"}, ["timezone"]),
    ({"external_id": "X1", "enrolled_at": "2099-01-01T10:00:00Z"}, ["enrolled_at"]),
    ({"external_id": "has space", "enrolled_at": "2026-01-01T10:00:00Z"}, ["external_id"]),
    ({"external_id": "X1", "enrolled_at": "2026-01-01T10:00:00Z", "contact": {"email": "nope"}},
     ["contact", "email"]),
    ({"external_id": "X1", "enrolled_at": "2026-01-01T10:00:00Z", "contact": {"fax": "1"}}, ["contact", "fax"]),
])
async def test_bad_enrolments_name_the_field(app_client: httpx.AsyncClient, coordinator: str,
                                             body: dict[str, Any], loc: list[str]) -> None:
    r = await app_client.post("/api/v1/studies/pal/participants", json=body, headers=auth(coordinator))
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["errors"]]


async def test_duplicate_external_id_is_409(app_client: httpx.AsyncClient, coordinator: str) -> None:
    enrolled = datetime.now(UTC)
    assert (await enrol(app_client, coordinator, "DUP", enrolled)).status_code == 201
    r = await enrol(app_client, coordinator, "DUP", enrolled - timedelta(days=1))
    assert r.status_code == 409
    got = (await app_client.get("/api/v1/studies/pal/participants/DUP", headers=auth(coordinator))).json()
    assert got["enrolled_at"] == enrolled.isoformat().replace("+00:00", "Z")


async def test_only_coordinators_see_participants(app_client: httpx.AsyncClient, admin: httpx.AsyncClient,
                                                  coordinator: str) -> None:
    await enrol(app_client, coordinator, "P9", datetime.now(UTC), contact={"email": "p9@example.org"})
    for role in ("collector", "analyst"):
        token = await create_token(admin, ADMIN_TOKEN, role)
        for path in ("/api/v1/studies/pal/participants", "/api/v1/studies/pal/participants/P9"):
            r = await app_client.get(path, headers=auth(token))
            assert r.status_code == 403, (role, path)
            assert "p9@example.org" not in r.text


async def test_contact_is_stored_sealed(app_client: httpx.AsyncClient, coordinator: str,
                                        connection: Connection) -> None:
    await enrol(app_client, coordinator, "SEAL", datetime.now(UTC), contact={"email": "secret@example.org",
                                                                             "phone": "+1 555 0100"})
    raw = connection.execute(text("SELECT sealed FROM participant_contacts")).scalars().all()
    assert raw and all(b"secret@example.org" not in bytes(b) and b"555" not in bytes(b) for b in raw)


async def test_list_filters_and_pages(app_client: httpx.AsyncClient, coordinator: str) -> None:
    now = datetime.now(UTC)
    for i in range(5):  # month6 window open for these (enrolled 180 days ago)
        await enrol(app_client, coordinator, f"OLD{i}", now - timedelta(days=180))
    for i in range(3):
        await enrol(app_client, coordinator, f"NEW{i}", now - timedelta(days=1))
    base = "/api/v1/studies/pal/participants"
    r = await app_client.get(base, params={"wave": "month6", "wave_status": "open"}, headers=auth(coordinator))
    assert sorted(p["external_id"] for p in r.json()["items"]) == [f"OLD{i}" for i in range(5)]
    r = await app_client.get(base, params={"wave": "baseline", "wave_status": "open"}, headers=auth(coordinator))
    assert sorted(p["external_id"] for p in r.json()["items"]) == [f"NEW{i}" for i in range(3)]
    r = await app_client.get(base, params={"wave": "baseline", "wave_status": "missed"}, headers=auth(coordinator))
    assert len(r.json()["items"]) == 5
    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await app_client.get(base, params=params, headers=auth(coordinator))).json()
        seen += [p["external_id"] for p in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == 8 == len(set(seen))
    r = await app_client.get(base, params={"wave_status": "bogus"}, headers=auth(coordinator))
    assert r.status_code == 422


async def test_withdraw_erases_contact_and_closes_windows(app_client: httpx.AsyncClient, coordinator: str,
                                                         connection: Connection) -> None:
    now = datetime.now(UTC)
    await enrol(app_client, coordinator, "W1", now - timedelta(days=200), contact={"email": "w1@example.org"})
    r = await app_client.post("/api/v1/studies/pal/participants/W1/withdraw",
                              json={"reason": "asked to stop", "erase_contact": True}, headers=auth(coordinator))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "withdrawn" and body["withdrawn_at"] and body["contact"] is None
    statuses = {s["wave"]: s["status"] for s in body["schedule"]}
    assert statuses == {"baseline": "missed", "month6": "withdrawn", "month12": "withdrawn"}
    assert connection.execute(text("SELECT count(*) FROM participant_contacts")).scalar_one() == 0
    r = await app_client.post("/api/v1/studies/pal/participants/W1/withdraw", json={"reason": "again"},
                              headers=auth(coordinator))
    assert r.status_code == 200 and r.json()["withdraw_reason"] == "asked to stop"
    r = await app_client.post("/api/v1/studies/pal/participants/W1/withdraw",
                              json={"reason": "x", "withdrawn_at": "2099-01-01T00:00:00Z"}, headers=auth(coordinator))
    assert r.status_code == 422
    r = await app_client.post("/api/v1/studies/pal/participants/NOPE/withdraw", json={"reason": "x"},
                              headers=auth(coordinator))
    assert r.status_code == 404


async def test_stored_statuses_follow_the_clock(app_client: httpx.AsyncClient, coordinator: str,
                                                database: Any, connection: Connection) -> None:
    from app.core.db import transaction
    from app.participants.repository import advance_schedules

    now = datetime.now(UTC)
    await enrol(app_client, coordinator, "CLK", now - timedelta(days=190))

    def stored() -> dict[str, str]:
        rows = connection.execute(text("SELECT wave, status FROM schedules")).all()
        return {w: s for w, s in rows}

    connection.execute(text("UPDATE schedules SET status = 'scheduled'"))
    with transaction(database) as session:
        assert advance_schedules(session, now) == (1, 1)
    assert stored() == {"baseline": "missed", "month6": "open", "month12": "scheduled"}
    with transaction(database) as session:
        assert advance_schedules(session, now + timedelta(days=400)) == (0, 2)
    assert stored() == {"baseline": "missed", "month6": "missed", "month12": "missed"}
