"""Webhook delivery through a real Celery worker: one killed mid-delivery leaves the event to be
delivered again by the next worker, with the same webhook-id."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import URL

from tests.conftest import ADMIN_TOKEN, make_settings, serve_app
from tests.factories import auth
from tests.processes import kill_group, start_worker, wait_for
from tests.test_workers import broker_for, client_app, worker_env, worker_seen
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.slow

REDIS_INDEX = 9  # a database index of this test's own on the machine's Redis


def test_a_worker_killed_mid_delivery_is_followed_by_the_same_webhook_id(fresh_db: URL, tmp_path: Path) -> None:
    broker = broker_for(fresh_db, REDIS_INDEX)
    settings = make_settings(fresh_db, tmp_path, redis_url=broker if broker.startswith("redis") else None,
                             webhooks_allow_loopback=True, webhooks_timeout_seconds=4.0, webhooks_retry_seconds=0.2)
    env = worker_env(settings, broker) | {"COHORT_WEBHOOKS_ALLOW_LOOPBACK": "1", "COHORT_WEBHOOKS_TIMEOUT_SECONDS": "4",
                                          "COHORT_WEBHOOKS_RETRY_SECONDS": "0.2"}
    receiver = Receiver(plan=["hang"], hang_seconds=60)
    tasks = client_app(broker)
    try:
        with serve_app(settings, fresh_db) as server:
            with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN), timeout=60) as client:
                client.post("/api/v1/studies", json={"key": "pal", "name": "PAL", "timezone": "UTC",
                                                     "template": "pal-replication"})
                r = client.post("/api/v1/studies/pal/webhooks", json={"url": receiver.url,
                                                                       "events": ["participant.enrolled"]})
                assert r.status_code == 201, r.text
                receiver.secret = r.json()["secret"]
                enrolled = (datetime.now(UTC) - timedelta(days=1)).isoformat()
                r = client.post("/api/v1/studies/pal/participants", json={"external_id": "P1",
                                                                          "enrolled_at": enrolled})
                assert r.status_code == 201, r.text

            worker = start_worker(env, tmp_path / "worker1.log", "--concurrency", "1")
            try:
                wait_for(lambda: worker_seen(server), 60, "the first worker")
                tasks.send_task("cohort.webhooks.deliver", queue="reminders")
                wait_for(lambda: bool(receiver.received), 30, "the first attempt", interval=0.05)
            finally:
                kill_group(worker)  # SIGKILL while the receiver holds the request open
            assert not receiver.accepted()

            worker = start_worker(env, tmp_path / "worker2.log", "--concurrency", "1")
            try:
                wait_for(lambda: worker_seen(server), 60, "the second worker")

                def redelivered() -> bool:
                    tasks.send_task("cohort.webhooks.deliver", queue="reminders")
                    return bool(receiver.accepted())

                wait_for(redelivered, 60, "the redelivery after the dead worker's lease", interval=1.0)
            finally:
                kill_group(worker, 15)
    finally:
        receiver.close()
    first, accepted = receiver.received[0], receiver.accepted()
    assert first.answered == 0 and len(accepted) == 1
    assert accepted[0].msg_id == first.msg_id and accepted[0].body == first.body
    assert all(r.valid for r in receiver.received)
    assert accepted[0].payload["type"] == "participant.enrolled"
