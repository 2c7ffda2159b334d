from __future__ import annotations

import hashlib

import httpx
import pytest
from sqlalchemy import Connection, text

from tests.conftest import ADMIN_TOKEN
from tests.factories import auth, create_study, create_token

pytestmark = pytest.mark.anyio


async def test_token_secret_is_shown_once_and_stored_hashed(admin: httpx.AsyncClient, connection: Connection) -> None:
    r = await admin.post("/api/v1/tokens", json={"role": "analyst", "label": "stats laptop"})
    assert r.status_code == 201
    body = r.json()
    assert body.keys() >= {"id", "token", "role", "label"}
    assert body["role"] == "analyst" and body["label"] == "stats laptop"
    stored = connection.execute(text("SELECT secret_hash FROM api_tokens WHERE id = :id"),
                                {"id": body["id"]}).scalar_one()
    assert stored == hashlib.sha256(body["token"].encode()).hexdigest()
    assert body["token"] not in stored
    listed = (await admin.get("/api/v1/tokens")).json()["items"]
    assert any(t["id"] == body["id"] for t in listed)
    assert all("token" not in t for t in listed)


async def test_revoked_token_is_refused(admin: httpx.AsyncClient) -> None:
    token = await create_token(admin, ADMIN_TOKEN, "coordinator")
    assert (await admin.get("/api/v1/studies", headers=auth(token))).status_code == 200
    token_id = next(t["id"] for t in (await admin.get("/api/v1/tokens")).json()["items"]
                    if t["label"] == "test coordinator")
    assert (await admin.delete(f"/api/v1/tokens/{token_id}")).status_code == 204
    r = await admin.get("/api/v1/studies", headers=auth(token))
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert (await admin.delete("/api/v1/tokens/00000000-0000-0000-0000-000000000000")).status_code == 404


async def test_401_without_or_with_a_bad_token_403_for_a_role_that_may_not(
    admin: httpx.AsyncClient, app_client: httpx.AsyncClient
) -> None:
    await create_study(admin, ADMIN_TOKEN, key="roles")
    collector = await create_token(admin, ADMIN_TOKEN, "collector")
    analyst = await create_token(admin, ADMIN_TOKEN, "analyst")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        r = await app_client.get("/api/v1/studies/roles", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["content-type"].startswith("application/problem+json")
    # collectors read instruments and nothing else
    assert (await admin.get("/api/v1/studies/roles/instruments", headers=auth(collector))).status_code == 200
    assert (await admin.get("/api/v1/studies/roles", headers=auth(collector))).status_code == 403
    assert (await admin.get("/api/v1/studies/roles/waves", headers=auth(collector))).status_code == 403
    # only admins make tokens; analysts do not create studies
    r = await admin.post("/api/v1/tokens", json={"role": "admin", "label": "x"}, headers=auth(analyst))
    assert r.status_code == 403
    r = await admin.post("/api/v1/studies", json={"key": "an-study", "name": "n", "timezone": "UTC"},
                         headers=auth(analyst))
    assert r.status_code == 403
    assert (await admin.get("/api/v1/studies/roles/waves", headers=auth(analyst))).status_code == 200


async def test_token_for_unknown_study_or_role_is_422(admin: httpx.AsyncClient) -> None:
    r = await admin.post("/api/v1/tokens", json={"role": "analyst", "label": "x", "study_key": "ghost"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["study_key"]
    r = await admin.post("/api/v1/tokens", json={"role": "superuser", "label": "x"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["role"]
