"""Failures on purpose: impatient clients, a database restart under load, a worker killed mid-fit
while the broker restarts. Bounded in time, loopback only."""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from app.core.embedded import EmbeddedPostgres
from app.core.migrations import run_migrations
from app.core.settings import Settings
from tests.conftest import ADMIN_TOKEN, LiveServer, make_settings, serve_app
from tests.factories import auth, simulated_pal_study, valid_answers
from tests.processes import RedisServer, kill_group, start_worker, wait_for

pytestmark = pytest.mark.slow


def setup_study(server: LiveServer, people: int) -> str:
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN), timeout=60) as client:
        assert client.post("/api/v1/studies", json={"key": "pal", "name": "PAL", "timezone": "UTC",
                                                    "template": "pal-replication"}).status_code == 201
        rows = [{"external_id": f"F{i:03d}", "enrolled_at": datetime.now(UTC).isoformat()} for i in range(people)]
        assert client.post("/api/v1/studies/pal/participants:import", json=rows).json()["created"] == people
        return str(client.post("/api/v1/tokens", json={"role": "collector", "label": "f"}).json()["token"])


def stored_answers(db_url: URL) -> dict[str, list[dict[str, Any]]]:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT p.external_id, r.answers FROM responses r "
                                 "JOIN participants p ON p.id = r.participant_id")).all()
    engine.dispose()
    out: dict[str, list[dict[str, Any]]] = {}
    for ext, answers in rows:
        out.setdefault(ext, []).append(answers)
    return out


def test_impatient_clients_with_retries_store_each_answer_once(live_server: LiveServer) -> None:
    people = 40
    collector = setup_study(live_server, people)
    answers = {f"F{i:03d}": valid_answers("baseline", random.Random(i)) for i in range(people)}
    acknowledged: set[str] = set()
    problems: list[str] = []
    lock = threading.Lock()

    def submit(ext: str, rng: random.Random) -> None:
        key = str(uuid.uuid4())  # one logical submission, retried under the same key
        body = {"external_id": ext, "wave": "baseline", "answers": answers[ext]}
        for _ in range(60):
            timeout = rng.choice([0.003, 0.01, 0.05, 5.0])  # often gives up before the server answers
            try:
                r = httpx.post(f"{live_server.url}/api/v1/studies/pal/responses", json=body, timeout=timeout,
                               headers={**auth(collector), "Idempotency-Key": key})
            except httpx.TimeoutException:
                continue
            if r.status_code >= 500:
                with lock:
                    problems.append(f"{ext}: {r.status_code} {r.text[:100]}")
            if r.status_code in (200, 201):
                with lock:
                    acknowledged.add(ext)
                return
            if r.status_code == 409 and r.json()["type"] == "/problems/response-complete":
                return  # a submission with another key got there first: the answers are stored
            assert r.json()["type"] == "/problems/idempotency-key-in-flight", r.text
            time.sleep(rng.uniform(0.01, 0.05))  # the first attempt under this key is still running
        with lock:
            problems.append(f"{ext}: no answer after 60 attempts")

    def client(worker: int) -> None:
        rng = random.Random(worker)
        for i in range(worker, people, 8):
            submit(f"F{i:03d}", rng)
            if rng.random() < 0.3:  # and sometimes a duplicate submission of the same answers
                submit(f"F{i:03d}", rng)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
    stored = stored_answers(live_server.db_url)
    assert {ext: len(rows) for ext, rows in stored.items()} == dict.fromkeys(answers, 1)  # exactly one each
    for ext in acknowledged:
        assert stored[ext] == [answers[ext]]  # every acknowledged answer is there, as sent
    assert len(acknowledged) == people


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, URL]]:
    data_dir = Path(tempfile.mkdtemp(prefix="cohort-restart-", dir="/var/tmp"))
    server = EmbeddedPostgres(data_dir)
    url = server.start()
    run_migrations(Settings.model_construct(database_url=url.render_as_string(hide_password=False)))
    try:
        yield server, url
    finally:
        server.owned = True
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_a_database_restart_under_load_gives_503_then_recovers_without_losing_writes(
    private_postgres: tuple[EmbeddedPostgres, URL], tmp_path: Path
) -> None:
    postgres, url = private_postgres
    settings = make_settings(url, tmp_path, rate_limit_per_minute=0)
    people = 400
    with serve_app(settings, url) as server:
        collector = setup_study(server, people)
        acknowledged: list[str] = []
        outage_codes: list[int] = []
        problem_bodies: list[bool] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                for i in range(people):
                    if stop.is_set():
                        return
                    ext = f"F{i:03d}"
                    key = str(uuid.uuid4())
                    body = {"external_id": ext, "wave": "baseline",
                            "answers": valid_answers("baseline", random.Random(i))}
                    while not stop.is_set():
                        try:
                            r = client.post("/api/v1/studies/pal/responses", json=body,
                                            headers={**auth(collector), "Idempotency-Key": key})
                        except httpx.TransportError:
                            time.sleep(0.05)
                            continue
                        if r.status_code in (200, 201):
                            acknowledged.append(ext)
                            break
                        outage_codes.append(r.status_code)
                        problem_bodies.append(r.headers.get("content-type", "").startswith("application/problem+json"))
                        time.sleep(0.05)

        thread = threading.Thread(target=load)
        thread.start()
        wait_for(lambda: len(acknowledged) >= 20, 60, "writes before the outage")
        postgres.stop()  # PostgreSQL goes away mid-load
        postgres.owned = False
        wait_for(lambda: len(outage_codes) >= 3, 30, "the service to report the outage")
        ready = httpx.get(f"{server.url}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("unreachable")
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # the process itself is fine
        during = len(acknowledged)
        time.sleep(1)
        assert len(acknowledged) == during  # nothing is acknowledged while the database is down
        postgres.start()  # and comes back; the service is not restarted
        wait_for(lambda: len(acknowledged) >= during + 20, 60, "writes after the restart")
        stop.set()
        thread.join(timeout=60)
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    assert set(outage_codes) == {503}, set(outage_codes)
    assert all(problem_bodies)
    stored = stored_answers(url)
    assert set(acknowledged) <= set(stored)  # no acknowledged write was lost
    assert all(len(rows) == 1 for rows in stored.values())


def test_a_killed_worker_and_a_restarted_broker_still_finish_every_fit_once(fresh_db: URL, tmp_path: Path) -> None:
    from tests.test_workers import worker_env

    redis = RedisServer()
    if redis.binary is None:
        pytest.skip("no redis-server binary on this machine to restart")
    redis.start()
    settings = make_settings(fresh_db, tmp_path, redis_url=redis.url, analysis_lease_seconds=3,
                             scan_interval_seconds=1.0)
    worker = None
    try:
        with serve_app(settings, fresh_db) as server:
            client = httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN), timeout=60)
            simulated_pal_study(server.url, ADMIN_TOKEN, settings, 1500, 2)
            ids = [client.post("/api/v1/studies/pal/analyses", json=body).json()["id"] for body in
                   ({"model": "abstinence"}, {"model": "abstinence", "variant": "model2"},
                    {"model": "online_attendance"})]
            worker = start_worker(worker_env(settings, redis.url), tmp_path / "first.log", "--queues", "analysis",
                                  "--concurrency", "1")

            def running() -> bool:
                return any(client.get(f"/api/v1/analyses/{i}").json()["status"] == "running" for i in ids)

            wait_for(running, 60, "a fit to start", interval=0.05)
            kill_group(worker)  # SIGKILL in the middle of a fit
            redis.stop()  # and the broker restarts empty
            redis.start()
            worker = start_worker(worker_env(settings, redis.url), tmp_path / "second.log", "--queues",
                                  "analysis,reminders", "--concurrency", "1", "--beat")

            def finished() -> bool:
                return all(client.get(f"/api/v1/analyses/{i}").json()["status"] in ("succeeded", "failed")
                           for i in ids)

            wait_for(finished, 120, "every fit to finish", interval=0.5)
            jobs = [client.get(f"/api/v1/analyses/{i}").json() for i in ids]
            client.close()
    finally:
        if worker is not None:
            kill_group(worker, 15)
        redis.stop()
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, [j["error"] for j in jobs]
    engine = create_engine(fresh_db)
    with engine.connect() as conn:
        attempts: dict[str, int] = {str(k): int(v) for k, v in
                                    conn.execute(text("SELECT id::text, attempts FROM analyses")).all()}
    engine.dispose()
    assert max(attempts.values()) >= 2  # the killed fit ran again ...
    assert all(j["finished_at"] and j["results"] for j in jobs)  # ... and each job has one result
