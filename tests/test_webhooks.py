"""Webhooks: signed (checked by the receiver's own Standard Webhooks code), each event once per
change in order through failures and timeouts, safe addresses only, redelivery and disabling."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Connection, Engine, text

from app.analysis import tasks as analyses
from app.core.db import Database
from app.core.settings import Settings
from app.webhooks import urls
from app.webhooks.tasks import run_deliveries
from tests.conftest import ADMIN_TOKEN, client_for, make_settings
from tests.factories import auth, create_study, create_token, valid_answers
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.anyio

BASE = "/api/v1/studies/pal"
ALL_EVENTS = ["participant.enrolled", "participant.withdrawn", "response.completed", "response.corrected",
              "reminder.failed", "analysis.succeeded", "analysis.failed"]


@pytest.fixture
def settings(shared_engine: Engine, tmp_path: Path) -> Settings:
    return make_settings(shared_engine.url, tmp_path, webhooks_allow_loopback=True, webhooks_timeout_seconds=0.5,
                         webhooks_retry_seconds=0.05)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(hang_seconds=1.5)
    yield r
    r.close()


async def subscribe(client: httpx.AsyncClient, receiver: Receiver, events: list[str] | None = None,
                    token: str = ADMIN_TOKEN) -> dict[str, Any]:
    r = await client.post(f"{BASE}/webhooks", headers=auth(token),
                          json={"url": receiver.url, "events": events or ALL_EVENTS, "description": "test receiver"})
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    receiver.secret = created["secret"]
    return created


def deliver_until(database: Database, settings: Settings, done: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the deliveries did not arrive in time"
        run_deliveries(database, settings, budget_seconds=5)
        time.sleep(0.05)


async def enrol(client: httpx.AsyncClient, external_id: str, **extra: Any) -> dict[str, Any]:
    enrolled = datetime.now(UTC) - timedelta(days=1)
    r = await client.post(f"{BASE}/participants", json={"external_id": external_id,
                                                        "enrolled_at": enrolled.isoformat(), **extra})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def complete_baseline(client: httpx.AsyncClient, external_id: str) -> dict[str, Any]:
    answers = valid_answers("baseline", random.Random(7), primary_group="smart")
    r = await client.post(f"{BASE}/responses", json={"external_id": external_id, "wave": "baseline",
                                                     "answers": answers, "status": "complete"})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_signed_events_arrive_once_each_in_order_through_500s_and_timeouts(
        admin: httpx.AsyncClient, database: Database, settings: Settings, receiver: Receiver) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    hook = await subscribe(admin, receiver)
    assert hook["secret"].startswith("whsec_") and hook["status"] == "active"
    receiver.plan = [500, "hang", 503]  # the first event fails twice with a 500 and once by timing out
    await enrol(admin, "P1", contact={"email": "p1@example.org", "name": "Pat One"})
    await enrol(admin, "P2")
    created = await complete_baseline(admin, "P1")
    r = await admin.patch(f"{BASE}/responses/{created['id']}", json={"answers": {"age": 44}, "reason": "typo"})
    assert r.status_code == 200, r.text
    r = await admin.post(f"{BASE}/participants/P1/withdraw", json={"reason": "moved", "erase_contact": True})
    assert r.status_code == 200, r.text

    deliver_until(database, settings, lambda: len({a.msg_id for a in receiver.accepted()}) == 5)

    assert all(r.valid for r in receiver.received), "every attempt is signed with the subscription's secret"
    accepted = receiver.accepted()
    assert len(accepted) == len({a.msg_id for a in accepted}) == 5, "each change is seen once"
    by_participant: dict[str, list[str]] = {}
    for a in accepted:
        by_participant.setdefault(a.payload["data"]["participant_id"], []).append(a.payload["type"])
    assert sorted(by_participant.values(), key=len) == [
        ["participant.enrolled"],
        ["participant.enrolled", "response.completed", "response.corrected", "participant.withdrawn"],
    ]
    # two 500s and a timeout (answered 0), each retried with the same webhook-id until it arrived
    failed = [r for r in receiver.received if not 200 <= r.answered < 300]
    assert sorted(r.answered for r in failed) == [0, 500, 503]
    assert {r.msg_id for r in failed} <= {a.msg_id for a in accepted}
    assert receiver.received[0].answered == 500
    for a in accepted:
        data = a.payload["data"]
        assert data["study"] == "pal" and len(data["pseudonym"]) >= 8
        assert "P1" not in a.body.decode() and "example.org" not in a.body.decode() and "answers" not in data
    corrected = next(a.payload for a in accepted if a.payload["type"] == "response.corrected")
    assert corrected["data"]["response_id"] == created["id"] and corrected["data"]["items"] == ["age"]

    log = (await admin.get(f"{BASE}/webhooks/{hook['id']}/deliveries")).json()["items"]
    assert len(log) == 5 and all(d["status"] == "succeeded" and d["response_code"] == 200 for d in log)
    assert sum(d["attempts"] for d in log) == 8 and all(d["last_error"] is None for d in log)
    assert {d["webhook_id"] for d in log} == {a.msg_id for a in accepted}


async def test_only_subscribed_events_and_no_event_without_its_change(
        admin: httpx.AsyncClient, database: Database, settings: Settings, receiver: Receiver,
        connection: Connection) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    hook = await subscribe(admin, receiver, events=["response.completed"])
    await enrol(admin, "P1")
    r = await admin.post(f"{BASE}/participants", json={"external_id": "P1", "enrolled_at": "2026-01-01T00:00:00Z"})
    assert r.status_code == 409
    r = await admin.post(f"{BASE}/responses", json={"external_id": "P1", "wave": "baseline", "status": "complete",
                                                    "answers": {"age": "x"}})
    assert r.status_code == 422
    assert connection.execute(text("SELECT count(*) FROM webhook_deliveries")).scalar_one() == 0
    await complete_baseline(admin, "P1")
    deliver_until(database, settings, lambda: len(receiver.accepted()) == 1)
    assert receiver.accepted()[0].payload["type"] == "response.completed"
    log = (await admin.get(f"{BASE}/webhooks/{hook['id']}/deliveries")).json()
    assert len(log["items"]) == 1 and log["next_cursor"] is None


async def test_a_bulk_import_emits_one_event_per_participant(
        admin: httpx.AsyncClient, database: Database, settings: Settings, receiver: Receiver) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    await subscribe(admin, receiver, events=["participant.enrolled"])
    rows = [{"external_id": f"I{i}", "enrolled_at": "2026-11-01T00:00:00Z"} for i in range(5)]
    r = await admin.post(f"{BASE}/participants:import", json=rows)
    assert r.json()["created"] == 5
    deliver_until(database, settings, lambda: len(receiver.accepted()) == 5)
    assert len({a.payload["data"]["pseudonym"] for a in receiver.accepted()}) == 5


@pytest.mark.parametrize("url", [
    "https://10.0.0.5/hook", "https://192.168.1.10/hook", "https://172.16.0.1/", "https://169.254.169.254/latest",
    "https://[fe80::1]/hook", "https://[fc00::1]/", "https://0.0.0.0/", "http://192.168.1.10/hook",
    "ftp://example.org/", "https://user:pw@127.0.0.1/", "not a url",
])
async def test_a_subscription_to_a_private_address_is_refused(admin: httpx.AsyncClient, url: str) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    r = await admin.post(f"{BASE}/webhooks", json={"url": url, "events": ["response.completed"]})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["errors"][0]["loc"] == ["url"]


def test_loopback_only_when_allowed_and_https_otherwise() -> None:
    for url in ("http://127.0.0.1:9/x", "https://127.0.0.1/x", "https://[::1]/x", "https://localhost/x"):
        with pytest.raises(urls.UnsafeURL):
            urls.check(url, allow_loopback=False)
    urls.check("http://127.0.0.1:9/x", allow_loopback=True)
    urls.check("https://[::1]/x", allow_loopback=True)
    urls.check("https://93.184.215.14/x", allow_loopback=False)  # a public address (no DNS needed)
    with pytest.raises(urls.UnsafeURL, match="https"):
        urls.check("http://93.184.215.14/x", allow_loopback=True)
    with pytest.raises(urls.UnsafeURL):
        urls.check("https://[::ffff:10.0.0.1]/x", allow_loopback=True)


async def test_roles_scope_and_secret_shown_once(admin: httpx.AsyncClient, receiver: Receiver) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    await create_study(admin, ADMIN_TOKEN, key="other")
    coordinator = await create_token(admin, ADMIN_TOKEN, "coordinator", study_key="pal")
    hook = await subscribe(admin, receiver, token=coordinator)
    listed = (await admin.get(f"{BASE}/webhooks", headers=auth(coordinator))).json()["items"]
    assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
    one = (await admin.get(f"{BASE}/webhooks/{hook['id']}", headers=auth(coordinator))).json()
    assert "secret" not in one
    r = await admin.get("/api/v1/studies/other/webhooks", headers=auth(coordinator))
    assert r.status_code == 403
    for role in ("collector", "analyst"):
        token = await create_token(admin, ADMIN_TOKEN, role)
        r = await admin.get(f"{BASE}/webhooks", headers=auth(token))
        assert r.status_code == 403
    r = await admin.delete(f"{BASE}/webhooks/{hook['id']}", headers=auth(coordinator))
    assert r.status_code == 204
    assert (await admin.get(f"{BASE}/webhooks/{hook['id']}")).status_code == 404


async def test_a_day_of_failures_disables_and_a_redelivery_brings_it_back(
        app: FastAPI, admin: httpx.AsyncClient, database: Database, settings: Settings, receiver: Receiver,
        connection: Connection) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    hook = await subscribe(admin, receiver, events=["participant.enrolled"])
    receiver.plan = [500]
    await enrol(admin, "P1")
    deliver_until(database, settings, lambda: len(receiver.received) == 1)
    # the failure clock started a day ago, and this delivery's day of retries is over
    connection.execute(text("UPDATE webhook_subscriptions SET failing_since = now() - interval '25 hours'"))
    connection.execute(text("UPDATE webhook_deliveries SET give_up_at = now(), next_attempt_at = now()"))
    receiver.plan = [500]
    deliver_until(database, settings, lambda: len(receiver.received) == 2)
    state = (await admin.get(f"{BASE}/webhooks/{hook['id']}")).json()
    assert state["status"] == "disabled" and state["disabled_reason"]
    async with client_for(app) as browser:
        r = await browser.post("/ui/login", data={"token": ADMIN_TOKEN})
        assert r.status_code == 303
        overview = await browser.get("/ui/studies/pal")
        assert overview.status_code == 200 and f'data-webhook="{hook["id"]}"' in overview.text
        assert "was disabled" in overview.text
    log = (await admin.get(f"{BASE}/webhooks/{hook['id']}/deliveries")).json()["items"]
    assert log[0]["status"] == "failed" and log[0]["attempts"] == 2 and log[0]["response_code"] == 500
    assert log[0]["last_error"] == "HTTP 500"
    await enrol(admin, "P2")  # a disabled subscription receives nothing new
    assert connection.execute(text("SELECT count(*) FROM webhook_deliveries")).scalar_one() == 1

    r = await admin.post(f"{BASE}/webhooks/{hook['id']}/deliveries/{log[0]['id']}:redeliver")
    assert r.status_code == 202, r.text
    assert (await admin.get(f"{BASE}/webhooks/{hook['id']}")).json()["status"] == "active"
    deliver_until(database, settings, lambda: len(receiver.accepted()) == 1)
    assert receiver.accepted()[0].msg_id == receiver.received[0].msg_id == log[0]["webhook_id"]
    log = (await admin.get(f"{BASE}/webhooks/{hook['id']}/deliveries")).json()["items"]
    assert log[0]["status"] == "succeeded" and log[0]["attempts"] == 3


async def test_redirects_are_not_followed(admin: httpx.AsyncClient, database: Database, settings: Settings,
                                          receiver: Receiver) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    hook = await subscribe(admin, receiver, events=["participant.enrolled"])
    receiver.plan = [302]
    await enrol(admin, "P1")
    deliver_until(database, settings, lambda: len(receiver.accepted()) == 1)
    assert [r.answered for r in receiver.received] == [302, 200]
    log = (await admin.get(f"{BASE}/webhooks/{hook['id']}/deliveries")).json()["items"]
    assert log[0]["attempts"] == 2


async def test_reminder_and_analysis_outcomes_are_events(
        admin: httpx.AsyncClient, database: Database, settings: Settings, receiver: Receiver) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal", timezone="UTC")
    await subscribe(admin, receiver, events=["reminder.failed", "analysis.succeeded", "analysis.failed"])
    # no email address: the invitation cannot be sent and fails
    r = await admin.post(f"{BASE}/participants", json={"external_id": "P1", "enrolled_at": "2026-11-02T08:00:00Z"})
    assert r.status_code == 201, r.text
    r = await admin.post(f"{BASE}/reminders:run", params={"now": "2026-11-02T10:00:00Z"})
    assert r.status_code == 200 and r.json()["failed"] >= 1, r.text
    r = await admin.post(f"{BASE}/analyses", json={"model": "table1"})
    assert r.status_code == 202, r.text
    analyses.run(database, settings, r.json()["id"])
    deliver_until(database, settings, lambda: len(receiver.accepted()) >= 2)
    types = [a.payload["type"] for a in receiver.accepted()]
    assert "reminder.failed" in types and ("analysis.succeeded" in types or "analysis.failed" in types)
    reminder = next(a.payload["data"] for a in receiver.accepted() if a.payload["type"] == "reminder.failed")
    assert reminder["wave"] == "baseline" and reminder["pseudonym"] and "error" not in reminder
    analysis = next(a.payload["data"] for a in receiver.accepted() if a.payload["type"].startswith("analysis."))
    assert analysis["model"] == "table1" and "pseudonym" not in analysis
