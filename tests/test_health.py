from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import Engine

from app.core.db import Database
from app.main import create_app
from tests.conftest import client_for, free_port, make_settings

pytestmark = pytest.mark.anyio


async def test_healthz_and_readyz(app_client: httpx.AsyncClient) -> None:
    r = await app_client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await app_client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["checks"] == {"database": "ok", "broker": "ok"}
    assert set(r.json()["workers"]) == {"reminders", "analysis"}


@pytest.fixture
async def no_broker(shared_engine: Engine, database: Database, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(shared_engine.url, tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    app = create_app(settings, database=database)
    async with app.router.lifespan_context(app), client_for(app) as client:
        yield client


async def test_readyz_is_503_when_the_broker_is_down(no_broker: httpx.AsyncClient) -> None:
    r = await no_broker.get("/readyz")
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["checks"]["broker"] == "unreachable"
    assert r.json()["checks"]["database"] == "ok"
    assert (await no_broker.get("/healthz")).status_code == 200
