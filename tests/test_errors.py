from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine

from app.core.db import Database
from app.main import create_app
from tests.conftest import ADMIN_TOKEN, client_for, make_settings
from tests.factories import auth

pytestmark = pytest.mark.anyio


def is_problem(r: httpx.Response) -> bool:
    body = r.json()
    return (r.headers["content-type"].startswith("application/problem+json")
            and {"type", "title", "status", "detail"} <= body.keys() and body["status"] == r.status_code)


async def test_unknown_route_and_wrong_method_are_problems(admin: httpx.AsyncClient) -> None:
    r = await admin.get("/api/v1/nothing-here")
    assert r.status_code == 404 and is_problem(r)
    r = await admin.delete("/healthz")
    assert r.status_code == 405 and is_problem(r)
    assert "GET" in r.headers["allow"]


async def test_non_json_body_is_415(admin: httpx.AsyncClient) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    r = await admin.post("/api/v1/studies", content=b"key=x", headers=form)
    assert r.status_code == 415 and is_problem(r)


async def test_malformed_json_is_400(admin: httpx.AsyncClient) -> None:
    r = await admin.post("/api/v1/studies", content=b'{"key": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and is_problem(r)


async def test_a_payload_that_is_not_an_object_is_422(admin: httpx.AsyncClient) -> None:
    r = await admin.post("/api/v1/studies", json=[1, 2, 3])
    assert r.status_code == 422 and is_problem(r)


@pytest.fixture
async def small_limit_client(
    shared_engine: Engine, database: Database, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(shared_engine.url, tmp_path, max_body_bytes=2048), database=database)
    async with app.router.lifespan_context(app), client_for(app) as client:
        yield client


async def test_a_body_above_the_limit_is_413(small_limit_client: httpx.AsyncClient) -> None:
    body = {"key": "big", "name": "x" * 5000, "timezone": "UTC"}
    r = await small_limit_client.post("/api/v1/studies", json=body, headers=auth(ADMIN_TOKEN))
    assert r.status_code == 413 and is_problem(r)

    async def stream() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"key": "big", "name": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'", "timezone": "UTC"}'

    r = await small_limit_client.post("/api/v1/studies", content=stream(),
                                      headers={**auth(ADMIN_TOKEN), "content-type": "application/json"})
    assert r.status_code == 413 and is_problem(r)
    assert (await small_limit_client.get("/api/v1/studies/big", headers=auth(ADMIN_TOKEN))).status_code == 404
