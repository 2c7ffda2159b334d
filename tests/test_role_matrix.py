"""Every API operation, with every role and with no token, against the roles it declares (x-roles).

A route added without a role declaration fails test_openapi; a declaration that is not
enforced (or enforced more strictly) fails here.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import ADMIN_TOKEN
from tests.factories import auth, create_study, create_token, valid_answers

pytestmark = pytest.mark.anyio

ROLES = ("admin", "coordinator", "collector", "analyst")


async def fixtures(admin: httpx.AsyncClient) -> dict[str, str]:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    await admin.post("/api/v1/studies/pal/participants", json={"external_id": "P1",
                                                                "enrolled_at": datetime.now(UTC).isoformat()})
    response = await admin.post("/api/v1/studies/pal/responses", json={
        "external_id": "P1", "wave": "baseline", "answers": valid_answers("baseline", random.Random(1))})
    analysis = await admin.post("/api/v1/studies/pal/analyses", json={"model": "table1"})
    return {"key": "pal", "external_id": "P1", "wave": "baseline", "response_id": response.json()["id"],
            "analysis_id": analysis.json()["id"], "token_id": str(uuid.uuid4()),
            "webhook_id": str(uuid.uuid4()), "delivery_id": str(uuid.uuid4())}


def operations(app: FastAPI) -> list[tuple[str, str, list[str], bool]]:
    out = []
    for path, ops in app.openapi()["paths"].items():
        if not path.startswith("/api/"):
            continue
        for method, op in ops.items():
            out.append((method.upper(), path, list(op["x-roles"]), "requestBody" in op))
    return out


async def test_every_operation_admits_exactly_its_declared_roles(app: FastAPI, admin: httpx.AsyncClient,
                                                                 app_client: httpx.AsyncClient) -> None:
    values = await fixtures(admin)
    tokens = {"admin": ADMIN_TOKEN, **{role: await create_token(admin, ADMIN_TOKEN, role) for role in ROLES[1:]}}
    ops = operations(app)
    assert len(ops) >= 30
    failures: list[str] = []
    for method, template, allowed, has_body in ops:
        path = template.format(**values)
        for role in (None, *ROLES):
            kwargs: dict[str, Any] = {"headers": auth(tokens[role]) if role else {}}
            if has_body:
                kwargs["json"] = {}
            r = await app_client.request(method, path, **kwargs)
            if role is None:
                expected_ok = r.status_code == 401
            elif role in allowed:
                expected_ok = r.status_code not in (401, 403) and r.status_code < 500
            else:
                expected_ok = r.status_code == 403
            if not expected_ok:
                failures.append(f"{method} {template} as {role or 'no token'}: {r.status_code} (allowed {allowed})")
            if r.status_code in (401, 403):
                assert r.headers["content-type"].startswith("application/problem+json")
    assert failures == []


async def test_the_published_matrix_matches_the_contract(app: FastAPI) -> None:
    ops = {(method, path): allowed for method, path, allowed, _ in operations(app)}
    assert ops[("POST", "/api/v1/tokens")] == ["admin"]
    assert ops[("GET", "/api/v1/studies/{key}/instruments")] == ["admin", "analyst", "collector", "coordinator"]
    assert ops[("POST", "/api/v1/studies/{key}/responses")] == ["admin", "collector", "coordinator"]
    assert ops[("GET", "/api/v1/studies/{key}/export")] == ["admin", "analyst"]
    assert ops[("POST", "/api/v1/studies/{key}/analyses")] == ["admin", "analyst"]
    assert ops[("GET", "/api/v1/studies/{key}/retention")] == ["admin", "analyst", "coordinator"]
    for (method, path), allowed in ops.items():
        if "collector" in allowed:  # collectors read instruments and post responses, nothing else
            assert (method, path) in {("GET", "/api/v1/studies/{key}/instruments"),
                                      ("GET", "/api/v1/studies/{key}/codebook"),
                                      ("POST", "/api/v1/studies/{key}/responses")}, (method, path)
        if "participants" in path or "audit" in path or "followup" in path:
            assert "analyst" not in allowed and "collector" not in allowed, (method, path)
