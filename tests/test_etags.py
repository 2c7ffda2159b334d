"""ETag / If-Match: a stale edit is refused with 412 and the current version, never applied."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, LiveServer
from tests.factories import auth, create_study, valid_answers

pytestmark = pytest.mark.anyio

BASE = "/api/v1/studies/pal"


def answers() -> dict[str, Any]:
    return valid_answers("baseline", random.Random(3), primary_group="smart")


async def setup(admin: httpx.AsyncClient) -> str:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    enrolled = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    r = await admin.post(f"{BASE}/participants", json={"external_id": "P1", "enrolled_at": enrolled})
    assert r.status_code == 201
    r = await admin.post(f"{BASE}/responses", json={"external_id": "P1", "wave": "baseline", "answers": answers(),
                                                    "status": "complete"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def test_a_stale_correction_is_412_with_the_current_version(admin: httpx.AsyncClient) -> None:
    response_id = await setup(admin)
    read = await admin.get(f"{BASE}/responses/{response_id}")
    tag = read.headers["etag"]
    assert tag.startswith('"') and (await admin.get(f"{BASE}/responses/{response_id}")).headers["etag"] == tag

    r = await admin.patch(f"{BASE}/responses/{response_id}", json={"answers": {"age": 40}, "reason": "a"},
                          headers={"If-Match": tag})
    assert r.status_code == 200, r.text
    newer = r.headers["etag"]
    assert newer != tag and (await admin.get(f"{BASE}/responses/{response_id}")).headers["etag"] == newer

    r = await admin.patch(f"{BASE}/responses/{response_id}", json={"answers": {"age": 41}, "reason": "b"},
                          headers={"If-Match": tag})
    assert r.status_code == 412
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["current_etag"] == newer and r.headers["etag"] == newer
    assert (await admin.get(f"{BASE}/responses/{response_id}")).json()["answers"]["age"] == 40

    r = await admin.patch(f"{BASE}/responses/{response_id}", json={"answers": {"age": 42}, "reason": "c"},
                          headers={"If-Match": f'W/{newer}, "other", {newer}'})
    assert r.status_code == 200
    r = await admin.patch(f"{BASE}/responses/{response_id}", json={"answers": {"age": 43}, "reason": "v1 client"})
    assert r.status_code == 200, "without If-Match the edit applies as in contract v1"


async def test_withdraw_honours_if_match(admin: httpx.AsyncClient) -> None:
    await setup(admin)
    tag = (await admin.get(f"{BASE}/participants/P1")).headers["etag"]
    r = await admin.post(f"{BASE}/participants/P1/withdraw", json={"reason": "x"}, headers={"If-Match": '"stale"'})
    assert r.status_code == 412 and r.json()["current_etag"] == tag
    assert (await admin.get(f"{BASE}/participants/P1")).json()["status"] != "withdrawn"
    r = await admin.post(f"{BASE}/participants/P1/withdraw", json={"reason": "x"}, headers={"If-Match": tag})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "withdrawn" and r.headers["etag"] != tag


def test_two_concurrent_corrections_with_one_etag_one_wins(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url, headers=auth(ADMIN_TOKEN), timeout=60) as client:
        client.post("/api/v1/studies", json={"key": "pal", "name": "PAL", "timezone": "UTC",
                                             "template": "pal-replication"})
        enrolled = (datetime.now(UTC) - timedelta(days=1)).isoformat()
        assert client.post(f"{BASE}/participants", json={"external_id": "P1", "enrolled_at": enrolled}).is_success
        r = client.post(f"{BASE}/responses", json={"external_id": "P1", "wave": "baseline", "answers": answers(),
                                                   "status": "complete"})
        response_id = r.json()["id"]
        tag = client.get(f"{BASE}/responses/{response_id}").headers["etag"]

    start = threading.Barrier(2)
    results: dict[int, httpx.Response] = {}

    def correct(age: int) -> None:
        with httpx.Client(base_url=live_server.url, headers=auth(ADMIN_TOKEN), timeout=60) as c:
            start.wait()
            results[age] = c.patch(f"{BASE}/responses/{response_id}", headers={"If-Match": tag},
                                   json={"answers": {"age": age}, "reason": f"set to {age}"})

    threads = [threading.Thread(target=correct, args=(age,)) for age in (50, 60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results.values()) == [200, 412]
    winner = next(age for age, r in results.items() if r.status_code == 200)
    loser = next(r for r in results.values() if r.status_code == 412)
    assert loser.json()["current_etag"] == results[winner].headers["etag"]

    with httpx.Client(base_url=live_server.url, headers=auth(ADMIN_TOKEN), timeout=60) as client:
        stored = client.get(f"{BASE}/responses/{response_id}").json()
        assert stored["answers"]["age"] == winner
        assert [c["after"] for c in stored["corrections"]] == [{"age": winner}]
        updates = client.get(f"{BASE}/audit", params={"table": "responses", "row_id": response_id,
                                                      "action": "UPDATE"}).json()["items"]
        corrections = client.get(f"{BASE}/audit", params={"table": "response_corrections"}).json()["items"]
    assert len(updates) == 1 and updates[0]["after"]["answers"]["age"] == winner
    assert len(corrections) == 1
