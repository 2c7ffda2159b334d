from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Connection, text
from starlette.datastructures import URL

from app.core.db import Database, transaction
from app.idempotency.service import _lock_id, _url_path, purge_expired
from tests.conftest import ADMIN_TOKEN, LiveServer
from tests.factories import auth, create_study, create_token, valid_answers

pytestmark = pytest.mark.anyio


@pytest.fixture
async def collector(admin: httpx.AsyncClient) -> str:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    coordinator = await create_token(admin, ADMIN_TOKEN, "coordinator")
    r = await admin.post("/api/v1/studies/pal/participants", headers=auth(coordinator),
                         json={"external_id": "P1", "enrolled_at": datetime.now(UTC).isoformat()})
    assert r.status_code == 201
    return await create_token(admin, ADMIN_TOKEN, "collector")


def body(seed: int = 1) -> dict[str, object]:
    return {"external_id": "P1", "wave": "baseline", "answers": valid_answers("baseline", random.Random(seed))}


def responses(connection: Connection) -> int:
    return int(connection.execute(text("SELECT count(*) FROM responses")).scalar_one())


async def test_a_retry_with_the_same_key_replays_the_stored_response(
    app_client: httpx.AsyncClient, collector: str, connection: Connection
) -> None:
    key = str(uuid.uuid4())
    headers = {**auth(collector), "Idempotency-Key": key}
    first = await app_client.post("/api/v1/studies/pal/responses", json=body(), headers=headers)
    again = await app_client.post("/api/v1/studies/pal/responses", json=body(), headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers.get("idempotent-replayed") == "true"
    assert responses(connection) == 1
    # without the key, the same answers are a second submission of a complete response: 409
    plain = await app_client.post("/api/v1/studies/pal/responses", json=body(), headers=auth(collector))
    assert plain.status_code == 409


async def test_the_same_key_with_another_body_is_422(app_client: httpx.AsyncClient, collector: str,
                                                     connection: Connection) -> None:
    headers = {**auth(collector), "Idempotency-Key": "k-1"}
    assert (await app_client.post("/api/v1/studies/pal/responses", json=body(1), headers=headers)).status_code == 201
    r = await app_client.post("/api/v1/studies/pal/responses", json=body(2), headers=headers)
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert responses(connection) == 1


async def test_keys_belong_to_their_token(app_client: httpx.AsyncClient, admin: httpx.AsyncClient,
                                          collector: str) -> None:
    other = await create_token(admin, ADMIN_TOKEN, "collector")
    key = {"Idempotency-Key": "shared-key"}
    assert (await app_client.post("/api/v1/studies/pal/responses", json=body(),
                                  headers={**auth(collector), **key})).status_code == 201
    r = await app_client.post("/api/v1/studies/pal/responses", json=body(), headers={**auth(other), **key})
    assert r.status_code == 409  # processed afresh for this token: the response is already complete


async def test_every_creating_post_honours_the_key(admin: httpx.AsyncClient, connection: Connection) -> None:
    key = {"Idempotency-Key": "create-study"}
    payload = {"key": "idem", "name": "n", "timezone": "UTC", "template": "pal-replication"}
    a = await admin.post("/api/v1/studies", json=payload, headers=key)
    b = await admin.post("/api/v1/studies", json=payload, headers=key)
    assert a.status_code == b.status_code == 201 and a.json() == b.json()
    t1 = await admin.post("/api/v1/tokens", json={"role": "analyst", "label": "x"}, headers={"Idempotency-Key": "t"})
    t2 = await admin.post("/api/v1/tokens", json={"role": "analyst", "label": "x"}, headers={"Idempotency-Key": "t"})
    assert t1.json() == t2.json()
    assert connection.execute(text("SELECT count(*) FROM api_tokens WHERE label = 'x'")).scalar_one() == 1
    stored = connection.execute(text("SELECT sealed_body FROM idempotency_keys")).scalars().all()
    assert all(t1.json()["token"].encode() not in bytes(s) for s in stored)  # replay bodies are sealed
    p = {"external_id": "I1", "enrolled_at": "2026-01-01T00:00:00Z", "contact": {"email": "i1@example.org"}}
    r1 = await admin.post("/api/v1/studies/idem/participants", json=p, headers={"Idempotency-Key": "p"})
    r2 = await admin.post("/api/v1/studies/idem/participants", json=p, headers={"Idempotency-Key": "p"})
    assert r1.status_code == r2.status_code == 201 and r1.json() == r2.json()
    i1 = await admin.post("/api/v1/studies/idem/participants:import", json=[dict(p, external_id="I2")],
                          headers={"Idempotency-Key": "imp"})
    i2 = await admin.post("/api/v1/studies/idem/participants:import", json=[dict(p, external_id="I2")],
                          headers={"Idempotency-Key": "imp"})
    assert i1.json() == i2.json() == {"created": 1, "errors": []}


def test_a_request_in_flight_with_the_key_is_409(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url, headers=auth(ADMIN_TOKEN)) as client:
        token_id = next(t["id"] for t in client.get("/api/v1/tokens").json()["items"])
        # another transaction is still working under this key: it holds the key's lock
        conninfo = live_server.db_url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo) as other:
            other.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_id(token_id, "busy"),))
            r = client.post("/api/v1/studies", json={"key": "busy", "name": "n", "timezone": "UTC"},
                            headers={"Idempotency-Key": "busy"})
            assert r.status_code == 409
            other.rollback()
        r = client.post("/api/v1/studies", json={"key": "busy", "name": "n", "timezone": "UTC"},
                        headers={"Idempotency-Key": "busy"})
        assert r.status_code == 201


async def test_keys_expire_after_a_day(admin: httpx.AsyncClient, database: Database, connection: Connection) -> None:
    payload = {"key": "exp", "name": "n", "timezone": "UTC"}
    assert (await admin.post("/api/v1/studies", json=payload, headers={"Idempotency-Key": "old"})).status_code == 201
    connection.execute(text("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'"))
    with transaction(database) as session:
        assert purge_expired(session, datetime.now(UTC)) == 1
    r = await admin.post("/api/v1/studies", json=payload, headers={"Idempotency-Key": "old"})
    assert r.status_code == 409  # processed afresh: the study exists
    assert datetime.now(UTC) - timedelta(hours=24) < datetime.now(UTC)


@given(st.text(min_size=0, max_size=40).map(lambda tail: "/" + tail), st.sampled_from([b"", b"a=1"]))
def test_a_key_is_bound_to_the_path_as_the_url_names_it(path: str, query: bytes) -> None:
    # stored fingerprints hash the request's path as Starlette's URL gives it; the hot path gets it
    # without building the URL, and must get the same string, or a retry would look like a new request
    scope = {"type": "http", "path": path, "headers": [(b"host", b"example.org")], "query_string": query,
             "scheme": "https", "server": ("example.org", 443)}
    assert _url_path(scope) == URL(scope=scope).path
