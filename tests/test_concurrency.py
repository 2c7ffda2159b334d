"""Many clients at once against a live server: exactly one stored response, never a 500."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import ADMIN_TOKEN, LiveServer
from tests.factories import auth, valid_answers

pytestmark = pytest.mark.anyio


async def prepare(client: httpx.AsyncClient) -> str:
    admin = auth(ADMIN_TOKEN)
    r = await client.post("/api/v1/studies", headers=admin, json={"key": "pal", "name": "PAL", "timezone": "UTC",
                                                                  "template": "pal-replication"})
    assert r.status_code == 201
    for ext in ("K1", "N1"):
        r = await client.post("/api/v1/studies/pal/participants", headers=admin,
                              json={"external_id": ext, "enrolled_at": datetime.now(UTC).isoformat()})
        assert r.status_code == 201
    r = await client.post("/api/v1/tokens", headers=admin, json={"role": "collector", "label": "front-end"})
    return str(r.json()["token"])


def stored(live_server: LiveServer, external_id: str) -> list[dict[str, object]]:
    engine = create_engine(live_server.db_url)
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT r.answers FROM responses r JOIN participants p ON p.id = r.participant_id "
            "WHERE p.external_id = :e"), {"e": external_id}).scalars().all()
    engine.dispose()
    return list(rows)


async def test_fifty_concurrent_posts_store_one_response(live_server: LiveServer) -> None:
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=live_server.url, timeout=60, limits=limits) as client:
        collector = await prepare(client)
        answers = valid_answers("baseline", random.Random(1))

        async def post(external_id: str, key: str | None) -> httpx.Response:
            headers = {**auth(collector), **({"Idempotency-Key": key} if key else {})}
            return await client.post("/api/v1/studies/pal/responses", headers=headers,
                                     json={"external_id": external_id, "wave": "baseline", "answers": answers})

        keyed = await asyncio.gather(*(post("K1", "same-key") for _ in range(50)))
        plain = await asyncio.gather(*(post("N1", None) for _ in range(50)))

    for results in (keyed, plain):
        codes = [r.status_code for r in results]
        assert set(codes) <= {201, 409}, codes
        assert codes.count(201) >= 1
        assert all(r.headers["content-type"].startswith("application/problem+json") for r in results
                   if r.status_code == 409)
    created_ids = {r.json()["id"] for r in keyed if r.status_code == 201}
    assert len(created_ids) == 1  # every 201 for the key is the one response (first or replayed)
    assert sum(1 for r in plain if r.status_code == 201) == 1
    assert stored(live_server, "K1") == [answers]
    assert stored(live_server, "N1") == [answers]


def test_a_201_is_only_sent_for_committed_answers(live_server: LiveServer) -> None:
    """Read each acknowledged response back through a separate connection the moment the 201 arrives."""
    engine = create_engine(live_server.db_url)
    with httpx.Client(base_url=live_server.url, timeout=30) as client, engine.connect() as conn:
        admin = auth(ADMIN_TOKEN)
        client.post("/api/v1/studies", headers=admin,
                    json={"key": "pal", "name": "PAL", "timezone": "UTC", "template": "pal-replication"})
        for i in range(20):
            ext = f"C{i}"
            client.post("/api/v1/studies/pal/participants", headers=admin,
                        json={"external_id": ext, "enrolled_at": datetime.now(UTC).isoformat()})
            answers = valid_answers("baseline", random.Random(i))
            r = client.post("/api/v1/studies/pal/responses", headers=admin,
                            json={"external_id": ext, "wave": "baseline", "answers": answers})
            assert r.status_code == 201
            seen = conn.execute(text("SELECT answers FROM responses WHERE id = :id"), {"id": r.json()["id"]})
            assert seen.scalar_one() == answers
            conn.rollback()
    engine.dispose()


async def test_a_correction_waits_for_a_withdrawal_of_the_same_participant(live_server: LiveServer) -> None:
    """A correction takes the participant's lock before the response's, as a withdrawal does, so
    the two run one after the other and the retention rollup by group stays exact (each trigger
    sees what the other wrote)."""
    import threading

    from app.core.db import Database
    from app.core.timeutil import utcnow
    from app.retention import repository as retention

    async with httpx.AsyncClient(base_url=live_server.url, timeout=60) as client:
        collector = await prepare(client)
        answers = valid_answers("baseline", random.Random(2), primary_group="smart")
        r = await client.post("/api/v1/studies/pal/responses", headers=auth(collector),
                              json={"external_id": "K1", "wave": "baseline", "answers": answers})
        assert r.status_code == 201, r.text
        response_id = r.json()["id"]

        engine = create_engine(live_server.db_url)
        holder = engine.connect()
        # what a withdrawal holds while it writes: the participant's row, FOR NO KEY UPDATE
        holder.execute(text("SELECT id FROM participants WHERE external_id = 'K1' FOR NO KEY UPDATE"))
        done = threading.Event()

        async def correct() -> httpx.Response:
            got = await client.patch(f"/api/v1/studies/pal/responses/{response_id}", headers=auth(ADMIN_TOKEN),
                                     json={"answers": {"primary_group": "wfs"}, "reason": "misread"})
            done.set()
            return got

        task = asyncio.create_task(correct())
        await asyncio.sleep(1.5)
        assert not done.is_set(), "the correction did not wait for the participant's lock"
        holder.execute(text("UPDATE participants SET status = 'withdrawn', withdrawn_at = now() "
                            "WHERE external_id = 'K1'"))
        holder.commit()
        holder.close()
        corrected = await task
        assert corrected.status_code == 200, corrected.text
        engine.dispose()

    db = Database.from_settings(live_server.settings)
    try:
        with db.sessions() as session:
            study_id = session.execute(text("SELECT id FROM studies WHERE key = 'pal'")).scalar_one()
            waves = ["baseline", "month6", "month12"]
            now = utcnow()
            rollup = retention.overall_and_groups(session, study_id, waves, now, "primary_group")
            plain = retention.overall_and_groups(session, study_id, waves, now, "primary_group", rollup=False)
            assert rollup == plain
            assert "wfs" in rollup[1] and "smart" not in rollup[1]
    finally:
        db.dispose()



def test_a_save_reads_the_response_its_lock_holder_stored(live_server: LiveServer) -> None:
    """A save reads the participant's stored responses only once it holds their lock, so it sees
    what the previous holder committed and merges into it (a read taken before the lock would miss
    it, insert a second row for the wave and be refused)."""
    answers = valid_answers("baseline", random.Random(7))
    items = sorted(answers)
    first, second = ({k: answers[k] for k in items[:10]}, {k: answers[k] for k in items[10:]})
    engine = create_engine(live_server.db_url)
    with httpx.Client(base_url=live_server.url, timeout=60) as client, engine.connect() as holder:
        admin = auth(ADMIN_TOKEN)
        assert client.post("/api/v1/studies", headers=admin, json={
            "key": "pal", "name": "PAL", "timezone": "UTC", "template": "pal-replication"}).status_code == 201
        for ext in ("K1", "K2"):
            assert client.post("/api/v1/studies/pal/participants", headers=admin, json={
                "external_id": ext, "enrolled_at": datetime.now(UTC).isoformat()}).status_code == 201

        def save(external_id: str, chunk: dict[str, object]) -> httpx.Response:
            return client.post("/api/v1/studies/pal/responses", headers=admin, json={
                "external_id": external_id, "wave": "baseline", "status": "partial", "answers": chunk})

        assert save("K2", first).status_code == 201
        # hold K1's lock, let a save of K1 queue for it, then give K1 the response K2 stored
        holder.execute(text("SELECT 1 FROM participants WHERE external_id = 'K1' FOR NO KEY UPDATE"))
        waiting: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: waiting.append(save("K1", second)))
        thread.start()
        deadline = time.monotonic() + 30
        while not holder.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'")).scalar_one():
            assert time.monotonic() < deadline, "the save never queued for the lock"
            time.sleep(0.02)
        holder.execute(text("UPDATE responses SET participant_id = (SELECT id FROM participants WHERE "
                            "external_id = 'K1') WHERE participant_id = (SELECT id FROM participants WHERE "
                            "external_id = 'K2')"))
        holder.commit()
        thread.join(timeout=60)
    engine.dispose()
    assert waiting and waiting[0].status_code == 200, waiting[0].text if waiting else "no answer"
    assert stored(live_server, "K1") == [answers]

