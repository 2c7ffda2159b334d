"""Reminders through real Celery worker processes, a real broker and a real SMTP server.

Uses the machine's Redis when it answers (its own database index), else Celery's SQLAlchemy
broker on the test database; the test that stops and restarts Redis runs its own
redis-server and is skipped only where no redis-server binary exists.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from celery import Celery
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from app.core.settings import Settings
from tests.conftest import ADMIN_TOKEN, SECRET_KEY, LiveServer, make_settings, serve_app
from tests.factories import auth, simulated_pal_study, valid_answers
from tests.processes import RedisServer, env_for, kill_group, machine_redis, start_worker, wait_for
from tests.smtp import SmtpServer

pytestmark = pytest.mark.slow


def midday_zone(now: datetime) -> str:
    """A zone where it is now between 10:00 and 17:00, so invitations are in sending hours."""
    for offset in range(-12, 15):
        name = f"Etc/GMT{-offset:+d}" if offset else "Etc/GMT"
        if dtime(10) <= now.astimezone(ZoneInfo(name)).time() < dtime(17):
            return name
    raise AssertionError("no zone at midday")


def broker_for(db_url: URL, index: int) -> str:
    return machine_redis(index) or "sqla+" + db_url.render_as_string(hide_password=False)


def worker_env(settings: Settings, broker: str) -> dict[str, str]:
    env = env_for(DATABASE_URL=str(settings.database_url), COHORT_SECRET_KEY=SECRET_KEY,
                  COHORT_DATA_DIR=str(settings.data_dir),
                  COHORT_REMINDER_LEASE_SECONDS=str(settings.reminder_lease_seconds),
                  COHORT_SCAN_INTERVAL_SECONDS=str(settings.scan_interval_seconds),
                  COHORT_ANALYSIS_LEASE_SECONDS=str(settings.analysis_lease_seconds), COHORT_LOG_LEVEL="INFO")
    if broker.startswith("redis"):
        env["REDIS_URL"] = broker
    if settings.smtp_url:
        env["SMTP_URL"] = settings.smtp_url
    return env


def client_app(broker: str) -> Celery:
    app = Celery("cohort-test", broker=broker)
    app.conf.broker_connection_retry_on_startup = True
    return app


def enrol_due(server: LiveServer, n: int, prefix: str) -> list[str]:
    """A study and n participants whose invitation is due now."""
    now = datetime.now(UTC)
    zone = midday_zone(now)
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN), timeout=60) as client:
        client.post("/api/v1/studies", json={"key": "pal", "name": "PAL", "timezone": zone,
                                             "template": "pal-replication"})
        rows = [{"external_id": f"{prefix}{i:03d}", "enrolled_at": (now - timedelta(hours=1)).isoformat(),
                 "contact": {"email": f"{prefix.lower()}{i}@example.org"}} for i in range(n)]
        r = client.post("/api/v1/studies/pal/participants:import", json=rows)
        assert r.json() == {"created": n, "errors": []}
    return [f"{prefix.lower()}{i}@example.org" for i in range(n)]


def worker_seen(server: LiveServer) -> bool:
    body = httpx.get(f"{server.url}/readyz", timeout=10).json()
    return bool(body.get("workers", {}).get("reminders", {}).get("status") == "ok")


def sent_rows(db_url: URL) -> Counter[str]:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT status, count(*) FROM reminder_sends GROUP BY status")).all()
    engine.dispose()
    return Counter({status: n for status, n in rows})


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


def test_a_worker_delivers_due_reminders(fresh_db: URL, tmp_path: Path, smtp: SmtpServer) -> None:
    broker = broker_for(fresh_db, 13)
    settings = make_settings(fresh_db, tmp_path, smtp_url=smtp.url,
                             redis_url=broker if broker.startswith("redis") else None)
    with serve_app(settings, fresh_db) as server:
        addresses = enrol_due(server, 5, "W")
        worker = start_worker(worker_env(settings, broker), tmp_path / "worker.log", "--concurrency", "1")
        try:
            wait_for(lambda: worker_seen(server), 60, "the worker's heartbeat through the broker")
            client_app(broker).send_task("cohort.reminders.scan", queue="reminders")
            wait_for(lambda: all(smtp.capture.to(a) for a in addresses), 60, "the invitations")
            # a message is recorded as sent just after the mail server takes it: stop the worker
            # only once all five are recorded (stopping it in between is the next test's case)
            wait_for(lambda: sent_rows(fresh_db)["sent"] == 5, 30, "the five sends recorded")
        finally:
            kill_group(worker, 15)
    assert sorted(m.to for m in smtp.capture.messages) == sorted(addresses)
    assert all("is open" in m.subject for m in smtp.capture.messages)
    assert sent_rows(fresh_db)["sent"] == 5


def test_a_killed_worker_and_two_schedulers_neither_lose_nor_repeat(fresh_db: URL, tmp_path: Path,
                                                                    smtp: SmtpServer) -> None:
    broker = broker_for(fresh_db, 14)
    settings = make_settings(fresh_db, tmp_path, smtp_url=smtp.url, reminder_lease_seconds=3,
                             redis_url=broker if broker.startswith("redis") else None)
    smtp.capture.delay = 0.05  # a slow mail server, so the kill lands in the middle of the batch
    with serve_app(settings, fresh_db) as server:
        addresses = enrol_due(server, 60, "K")
        first = start_worker(worker_env(settings, broker), tmp_path / "first.log", "--concurrency", "1")
        try:
            wait_for(lambda: worker_seen(server), 60, "the first worker")
            client_app(broker).send_task("cohort.reminders.scan", queue="reminders")
            wait_for(lambda: len(smtp.capture.messages) >= 8, 60, "some messages before the kill")
        finally:
            killed_at = time.time()
            kill_group(first)  # SIGKILL: no chance to finish or record anything
        delivered_before = len(smtp.capture.messages)
        assert delivered_before < 60, "the kill came too late to test anything"

        # Two schedulers at once: a new worker's periodic scans and coordinators' reminders:run calls.
        second = start_worker(worker_env(settings, broker), tmp_path / "second.log", "--concurrency", "2")
        stop = threading.Event()

        def coordinator_runs() -> None:
            with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN), timeout=120) as client:
                while not stop.is_set():
                    client.post("/api/v1/studies/pal/reminders:run")
                    time.sleep(0.5)

        runner = threading.Thread(target=coordinator_runs)
        runner.start()
        try:
            app = client_app(broker)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not all(smtp.capture.to(a) for a in addresses):
                app.send_task("cohort.reminders.scan", queue="reminders")
                time.sleep(1)
        finally:
            stop.set()
            runner.join()
            kill_group(second, 15)
    received = Counter(m.to for m in smtp.capture.messages)
    print(f"\nbroker {broker.split(':')[0]}; delivered before the kill {delivered_before}; "
          f"repeats {sum(received.values()) - len(received)}")
    assert set(received) == set(addresses), (
        f"lost: {sorted(set(addresses) - set(received))} killed at {killed_at:.3f} "
        f"last before kill {max(m.at for m in smtp.capture.messages if m.at <= killed_at):.3f} {_rows_of(fresh_db)}")
    repeats = {a: n for a, n in received.items() if n > 1}
    assert repeats == {}, repeats
    assert sent_rows(fresh_db)["sent"] == 60


def test_responses_are_accepted_while_redis_is_down_and_reminders_follow_its_return(
    fresh_db: URL, tmp_path: Path, smtp: SmtpServer
) -> None:
    redis = RedisServer()
    if redis.binary is None:
        pytest.skip("no redis-server binary on this machine to stop and restart")
    redis.start()
    settings = make_settings(fresh_db, tmp_path, smtp_url=smtp.url, redis_url=redis.url, scan_interval_seconds=1.0)
    worker = None
    try:
        with serve_app(settings, fresh_db) as server:
            worker = start_worker(worker_env(settings, redis.url), tmp_path / "worker.log", "--concurrency", "1",
                                  "--beat")
            wait_for(lambda: worker_seen(server), 60, "the worker")
            redis.stop()
            addresses = enrol_due(server, 3, "R")
            with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN), timeout=60) as client:
                r = client.post("/api/v1/studies/pal/responses", json={
                    "external_id": "R000", "wave": "baseline", "answers": valid_answers("baseline", _rng())})
                assert r.status_code == 201, r.text
                assert client.get("/readyz").status_code == 503  # the broker is down, and says so
            time.sleep(3)
            assert not smtp.capture.messages
            redis.start()  # same port: the worker and beat reconnect on their own
            wait_for(lambda: all(smtp.capture.to(a) for a in addresses[1:]), 90, "reminders after Redis returned")
    finally:
        if worker is not None:
            kill_group(worker, 15)
        redis.stop()
    assert not smtp.capture.to(addresses[0])  # R000 completed the baseline: nothing to remind


def _rows_of(db_url: URL) -> list[Any]:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT p.external_id, r.status, r.attempts, r.last_error, "
                                 "extract(epoch from r.updated_at) FROM reminder_sends r "
                                 "JOIN participants p ON p.id = r.participant_id WHERE r.status <> 'sent' "
                                 "OR r.last_error IS NOT NULL")).all()
    engine.dispose()
    return [tuple(r) for r in rows]


def _rng() -> Any:
    import random

    return random.Random(5)


def test_a_worker_fits_queued_analyses(fresh_db: URL, tmp_path: Path) -> None:
    broker = broker_for(fresh_db, 12)
    settings = make_settings(fresh_db, tmp_path, redis_url=broker if broker.startswith("redis") else None)
    with serve_app(settings, fresh_db) as server, httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN),
                                                               timeout=60) as client:
        simulated_pal_study(server.url, ADMIN_TOKEN, settings, 400, 9)
        analyst = client.post("/api/v1/tokens", json={"role": "analyst", "label": "PI"}).json()["token"]
        ids = []
        for body in ({"model": "table1"}, {"model": "online_attendance"}, {"model": "abstinence"},
                     {"model": "abstinence", "variant": "model2"}):
            r = client.post("/api/v1/studies/pal/analyses", json=body, headers=auth(analyst))
            assert r.status_code == 202 and r.json()["status"] == "queued"
            ids.append(r.json()["id"])
        worker = start_worker(worker_env(settings, broker), tmp_path / "worker.log", "--queues", "analysis",
                              "--concurrency", "1")
        try:
            def done() -> bool:
                states = [client.get(f"/api/v1/analyses/{i}", headers=auth(analyst)).json()["status"] for i in ids]
                return all(s in ("succeeded", "failed") for s in states)

            wait_for(done, 120, "the worker to fit the four models", interval=1)
        finally:
            kill_group(worker, 15)
        jobs = [client.get(f"/api/v1/analyses/{i}", headers=auth(analyst)).json() for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 4, [j["error"] for j in jobs]
    assert {j["data"]["snapshot_sha256"] for j in jobs} == {jobs[0]["data"]["snapshot_sha256"]}
