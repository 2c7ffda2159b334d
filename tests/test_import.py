from __future__ import annotations

import csv
import io
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, text
from sqlalchemy.engine import URL

from tests.conftest import ADMIN_TOKEN, LiveServer
from tests.factories import auth, create_study, create_token

pytestmark = pytest.mark.anyio

URL_ = "/api/v1/studies/pal/participants:import"


def csv_body(rows: list[dict[str, Any]], columns: tuple[str, ...] = ("external_id", "enrolled_at", "timezone",
                                                                    "email", "phone", "name")) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def people(n: int, prefix: str = "C", start: int = 0) -> list[dict[str, Any]]:
    base = datetime(2026, 1, 5, 14, 0, tzinfo=UTC)
    return [{"external_id": f"{prefix}{i:06d}", "enrolled_at": (base + timedelta(hours=i % 500)).isoformat(),
             "timezone": "" if i % 3 else "America/Los_Angeles", "email": f"{prefix.lower()}{i}@example.org",
             "phone": "", "name": f"Person {i}"} for i in range(start, start + n)]


@pytest.fixture
async def coordinator(admin: httpx.AsyncClient) -> str:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    return await create_token(admin, ADMIN_TOKEN, "coordinator")


def count(connection: Connection, table: str) -> int:
    return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


async def post_csv(client: httpx.AsyncClient, token: str, body: bytes, **params: Any) -> httpx.Response:
    return await client.post(URL_, content=body, params=params, headers={**auth(token), "content-type": "text/csv"})


async def test_csv_import_creates_participants_with_schedules_and_contacts(
    app_client: httpx.AsyncClient, coordinator: str, connection: Connection
) -> None:
    r = await post_csv(app_client, coordinator, csv_body(people(30)))
    assert r.status_code == 200, r.text
    assert r.json() == {"created": 30, "errors": []}
    assert count(connection, "participants") == 30
    assert count(connection, "schedules") == 90
    assert count(connection, "participant_contacts") == 30
    one = (await app_client.get("/api/v1/studies/pal/participants/C000003", headers=auth(coordinator))).json()
    assert one["timezone"] == "America/Los_Angeles" and one["contact"]["email"] == "c3@example.org"
    assert len(one["schedule"]) == 3
    other = (await app_client.get("/api/v1/studies/pal/participants/C000004", headers=auth(coordinator))).json()
    assert other["timezone"] == "America/New_York"


async def test_json_import_takes_the_objects_of_a_single_enrolment(
    app_client: httpx.AsyncClient, coordinator: str, connection: Connection
) -> None:
    rows = [{"external_id": f"J{i}", "enrolled_at": "2026-02-01T09:00:00+01:00",
             "contact": {"email": f"j{i}@example.org"}} for i in range(5)]
    r = await app_client.post(URL_, json=rows, headers=auth(coordinator))
    assert r.status_code == 200 and r.json()["created"] == 5
    assert count(connection, "participants") == 5


async def test_one_bad_row_stores_nothing_unless_partial(
    app_client: httpx.AsyncClient, coordinator: str, connection: Connection
) -> None:
    rows = people(21)
    rows[10]["enrolled_at"] = "not a date"
    rows[15]["timezone"] = "Atlantis/Capital"
    rows[17]["email"] = "no-at-sign"
    r = await post_csv(app_client, coordinator, csv_body(rows))
    assert r.status_code == 200
    body = r.json()
    assert body["created"] == 0
    assert [(e["row"], e["loc"]) for e in body["errors"]] == [(11, ["enrolled_at"]), (16, ["timezone"]),
                                                              (18, ["email"])]
    assert count(connection, "participants") == 0
    r = await post_csv(app_client, coordinator, csv_body(rows), partial="true")
    assert r.json()["created"] == 18 and len(r.json()["errors"]) == 3
    assert count(connection, "participants") == 18
    assert count(connection, "schedules") == 54


async def test_duplicates_in_the_file_and_in_the_study_are_reported_per_row(
    app_client: httpx.AsyncClient, coordinator: str, connection: Connection
) -> None:
    assert (await post_csv(app_client, coordinator, csv_body(people(3)))).json()["created"] == 3
    rows = people(5, start=2)  # C000002 already enrolled
    rows.append(dict(rows[0], external_id="C000005"))  # repeated inside the file
    r = await post_csv(app_client, coordinator, csv_body(rows), partial="true")
    errors = [(e["row"], e["code"]) for e in r.json()["errors"]]
    assert errors == [(1, "duplicate"), (6, "duplicate")]
    assert r.json()["created"] == 4
    assert count(connection, "participants") == 7


async def test_bad_files_are_problems(app_client: httpx.AsyncClient, coordinator: str) -> None:
    r = await post_csv(app_client, coordinator, b"external_id,enrolled_at,shoe_size\nA,2026-01-01T00:00:00Z,9\n")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["header", "shoe_size"]
    r = await post_csv(app_client, coordinator, b"external_id\nA\n")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["header", "enrolled_at"]
    r = await post_csv(app_client, coordinator, b"")
    assert r.status_code == 422
    r = await app_client.post(URL_, json={"external_id": "A"}, headers=auth(coordinator))
    assert r.status_code == 422
    r = await app_client.post(URL_, content=b"[{", headers={**auth(coordinator), "content-type": "application/json"})
    assert r.status_code == 400
    r = await app_client.post(URL_, content=b"x", headers={**auth(coordinator), "content-type": "application/xml"})
    assert r.status_code == 415


@pytest.mark.slow
def test_import_of_100000_participants(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url, timeout=300) as client:
        admin = auth(ADMIN_TOKEN)
        assert client.post("/api/v1/studies", headers=admin, json={"key": "pal", "name": "PAL",
                                                                   "timezone": "America/New_York",
                                                                   "template": "pal-replication"}).status_code == 201
        body = csv_body(people(100_000))
        started = time.perf_counter()
        r = client.post(URL_, content=body, headers={**admin, "content-type": "text/csv"})
        elapsed = time.perf_counter() - started
        assert r.status_code == 200, r.text[:500]
        assert r.json() == {"created": 100_000, "errors": []}
        print(f"\n100,000-row import: {elapsed:.1f} s")
    _assert_counts(live_server.db_url, 100_000)


def _assert_counts(url: URL, n: int) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.connect() as conn:
        assert count(conn, "participants") == n
        assert count(conn, "schedules") == 3 * n
        assert count(conn, "participant_contacts") == n
    engine.dispose()


def test_rows_are_numbered_like_the_file() -> None:
    body = json.loads(json.dumps(people(2)))
    assert body[0]["external_id"] == "C000000"
