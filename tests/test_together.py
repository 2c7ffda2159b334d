"""Concurrent POST /responses stored together (app.responses.together): a group shares one
transaction, and what it stores is what the requests would have stored one at a time.

A group is made here the way a burst makes one: one request is held up (its participant locked by
another connection) while the others arrive and wait; released, it is stored alone, and the ones
that waited are stored as one group.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL

from app.responses import together
from app.responses.together import Groups
from tests.conftest import ADMIN_TOKEN, client_for, clone_database, drop_database, make_settings
from tests.factories import auth, create_study, create_token, valid_answers
from tests.written import written

pytestmark = pytest.mark.anyio

URL_OF = "/api/v1/studies/pal/responses"


@asynccontextmanager
async def running(url: URL, tmp_path: Path, *, groups: bool = True) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app on a database of its own (real commits); one group stored at a time (a pool of 4), with
    room for the requests that wait for it."""
    from app.main import create_app

    application = create_app(make_settings(url, tmp_path, db_pool_size=4, max_in_flight=24))
    if not groups:
        application.state.response_groups = None  # every request stored on its own
    async with application.router.lifespan_context(application), client_for(application, ADMIN_TOKEN) as admin:
        yield application, admin


async def pal_study(admin: httpx.AsyncClient, people: int, *, webhook: bool = True) -> str:
    """Study `pal`, participants P01.. enrolled a year ago, a subscribed webhook; a collector token."""
    await create_study(admin, ADMIN_TOKEN, key="pal")
    enrolled = (datetime.now(UTC) - timedelta(days=370)).isoformat()
    rows = [{"external_id": f"P{i:02d}", "enrolled_at": enrolled} for i in range(1, people + 1)]
    assert (await admin.post("/api/v1/studies/pal/participants:import", json=rows)).json()["created"] == people
    if webhook:
        assert (await admin.post("/api/v1/studies/pal/webhooks", json={
            "url": "https://93.184.215.14/hook", "events": ["response.completed"]})).status_code == 201
    return await create_token(admin, ADMIN_TOKEN, "collector")


def baseline(external_id: str, seed: int, **fixed: Any) -> dict[str, Any]:
    return {"external_id": external_id, "wave": "baseline",
            "answers": valid_answers("baseline", random.Random(seed), **fixed)}


@contextmanager
def held(engine: Engine, external_id: str) -> Iterator[None]:
    """`external_id`'s participant row locked by another connection until the block ends."""
    with engine.connect() as other:
        other.execute(text("SELECT id FROM participants WHERE external_id = :e FOR UPDATE"), {"e": external_id})
        yield
        other.rollback()


async def until(check: Any, what: str) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"timed out waiting for {what}")


def lock_waits(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                     "AND datname = current_database()")).scalar_one())


async def as_a_group(application: FastAPI, engine: Engine, first: Any, rest: list[Any]) -> list[httpx.Response]:
    """Send `first`, held at its participant's lock, then `rest` while it waits, then let it go: the
    rest are stored as one group (a pool of 4 stores one group of a lane at a time). The answers in
    order."""
    groups: Groups = application.state.response_groups
    with held(engine, first[0]), pytest.MonkeyPatch.context() as patch:
        patch.setattr(together, "LOCK_WAIT", "60s")  # the first's group waits for the lock until let go
        started = asyncio.ensure_future(first[1]())
        await until(lambda: lock_waits(engine) == 1, "the first request to wait for its participant")
        others = [asyncio.ensure_future(send()) for _, send in rest]
        await until(lambda: groups.waiting == len(rest), "the others to wait for a group")
    return [await started, *[await other for other in others]]


def post(admin: httpx.AsyncClient, collector: str, body: dict[str, Any], key: str | None = None) -> Any:
    headers = {**auth(collector), **({"Idempotency-Key": key} if key else {})}
    return body["external_id"], lambda: admin.post(URL_OF, json=body, headers=headers)


def response_audit_transactions(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(DISTINCT txid) FROM audit_log "
                                     "WHERE table_name = 'responses' AND action = 'INSERT'")).scalar_one())


async def test_a_group_stores_what_the_requests_would_have_stored_one_at_a_time(
        template_db: URL, tmp_path: Path) -> None:
    urls = [clone_database(template_db), clone_database(template_db)]
    engines = [create_engine(url) for url in urls]
    try:
        outcomes = []
        for url, engine, together in zip(urls, engines, (True, False), strict=True):
            async with running(url, tmp_path, groups=together) as (application, admin):
                collector = await pal_study(admin, 12)
                requests = [post(admin, collector, baseline(f"P{i:02d}", i), key=f"k{i}" if i % 2 else None)
                            for i in range(1, 13)]
                if together:
                    replies = await as_a_group(application, engine, requests[0], requests[1:])
                else:
                    replies = [await send() for _, send in requests]
                assert [r.status_code for r in replies] == [201] * 12, [r.text for r in replies]
                outcomes.append([{k: v for k, v in r.json().items() if k not in ("id", "received_at", "completed_at")}
                                 for r in replies])
        # the first alone, the other eleven in one transaction; one at a time, twelve
        assert [response_audit_transactions(engine) for engine in engines] == [2, 12]
        assert outcomes[0] == outcomes[1]  # the same answers to the clients
        tables = []
        for engine in engines:
            with engine.connect() as conn:
                tables.append(written(conn, by_transaction=False))
        assert tables[0]["responses"] and tables[0]["idempotency_keys"] and tables[0]["webhook_deliveries"]
        for table in tables[0]:
            assert tables[0][table] == tables[1][table], table
        with engines[0].connect() as conn:  # every audit row names the collector's token
            actors = conn.execute(text(
                "SELECT a.actor = (SELECT id::text FROM api_tokens WHERE label = 'test collector'), count(*) "
                "FROM audit_log a WHERE (a.table_name, a.action) IN (('responses', 'INSERT'), ('schedules', 'UPDATE')) "
                "GROUP BY 1")).all()
            assert [tuple(row) for row in actors] == [(True, 24)]
    finally:
        for engine in engines:
            engine.dispose()
        for url in urls:
            drop_database(url)


async def test_each_request_of_a_group_gets_its_own_answer(fresh_db: URL, tmp_path: Path) -> None:
    engine = create_engine(fresh_db)
    try:
        async with running(fresh_db, tmp_path) as (application, admin):
            collector = await pal_study(admin, 8, webhook=False)
            first = await admin.post(URL_OF, json=baseline("P06", 6), headers={**auth(collector),
                                                                                "Idempotency-Key": "once"})
            assert first.status_code == 201, first.text
            answers = list(valid_answers("baseline", random.Random(5)).items())
            partial = {"external_id": "P05", "wave": "baseline", "answers": dict(answers[:10]), "status": "partial"}
            assert (await admin.post(URL_OF, json=partial, headers=auth(collector))).status_code == 201
            assert (await admin.post("/api/v1/studies/pal/participants/P07/withdraw",
                                     json={"reason": "moved away"})).status_code == 200
            bad = baseline("P04", 4)
            bad["answers"]["age"] = 7
            replies = await as_a_group(application, engine, post(admin, collector, baseline("P01", 1)), [
                post(admin, collector, baseline("P02", 2), key="p02"),
                post(admin, collector, baseline("P03", 3)),
                post(admin, collector, bad, key="p04"),
                post(admin, collector, {"external_id": "P05", "wave": "baseline", "answers": dict(answers[10:])}),
                post(admin, collector, baseline("P06", 6), key="once"),
                post(admin, collector, baseline("P07", 7)),
                post(admin, collector, baseline("P02", 22), key="p02-again"),
            ])
        status = {i: r.status_code for i, r in enumerate(replies)}
        assert status == {0: 201, 1: 201, 2: 201, 3: 422, 4: 200, 5: 201, 6: 409, 7: 409}, [r.text for r in replies]
        assert [e["loc"] for e in replies[3].json()["errors"]] == [["answers", "age"]]
        assert replies[4].json()["status"] == "complete"  # merged into the stored partial
        assert replies[5].headers.get("idempotent-replayed") == "true"
        assert replies[5].json() == first.json()  # the stored reply, not a second response
        assert "withdrawn" in replies[6].json()["detail"]
        assert "already complete" in replies[7].json()["detail"]  # after P02's first, in a later group
        with engine.connect() as conn:
            stored: dict[str, str] = dict(conn.execute(text(
                "SELECT p.external_id, r.status FROM responses r "
                "JOIN participants p ON p.id = r.participant_id")).all())
            assert stored == {"P01": "complete", "P02": "complete", "P03": "complete", "P05": "complete",
                              "P06": "complete"}
            keys = conn.execute(text("SELECT key FROM idempotency_keys ORDER BY key")).scalars().all()
            assert keys == ["once", "p02"]
    finally:
        engine.dispose()


async def test_a_group_whose_transaction_fails_is_stored_one_request_at_a_time(fresh_db: URL, tmp_path: Path) -> None:
    engine = create_engine(fresh_db)
    try:
        with engine.begin() as conn:  # a fault: any statement storing more than one response fails
            conn.execute(text("""
                CREATE FUNCTION test_refuse_many() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF (SELECT count(*) FROM new_rows) > 1 THEN RAISE EXCEPTION 'refused for the test'; END IF;
                    RETURN NULL;
                END $$;
                CREATE TRIGGER test_refuse_many AFTER INSERT ON responses REFERENCING NEW TABLE AS new_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION test_refuse_many();"""))
        async with running(fresh_db, tmp_path) as (application, admin):
            collector = await pal_study(admin, 6)
            replies = await as_a_group(application, engine, post(admin, collector, baseline("P01", 1)), [
                post(admin, collector, baseline(f"P{i:02d}", i), key=f"k{i}") for i in range(2, 7)])
        assert [r.status_code for r in replies] == [201] * 6, [r.text for r in replies]
        with engine.connect() as conn:
            counts = conn.execute(text(
                "SELECT (SELECT count(*) FROM responses), (SELECT count(*) FROM idempotency_keys), "
                "(SELECT count(*) FROM webhook_deliveries), "
                "(SELECT count(*) FROM schedules WHERE status = 'completed'), "
                "(SELECT count(*) FROM audit_log WHERE table_name = 'responses'), "
                "(SELECT count(DISTINCT txid) FROM audit_log WHERE table_name = 'responses')")).one()
            assert tuple(counts) == (6, 5, 6, 6, 6, 6)  # each once, each in a transaction of its own
    finally:
        engine.dispose()


async def test_a_revoked_token_stores_nothing_in_a_group(fresh_db: URL, tmp_path: Path) -> None:
    engine = create_engine(fresh_db)
    try:
        async with running(fresh_db, tmp_path) as (application, admin):
            collector = await pal_study(admin, 4, webhook=False)
            assert (await admin.post(URL_OF, json=baseline("P04", 4), headers=auth(collector))).status_code == 201
            token_id = next(t["id"] for t in (await admin.get("/api/v1/tokens")).json()["items"]
                            if t["label"] == "test collector")
            assert (await admin.delete(f"/api/v1/tokens/{token_id}")).status_code == 204
            replies = await as_a_group(application, engine, post(admin, collector, baseline("P01", 1)), [
                post(admin, collector, baseline(f"P{i:02d}", i), key=f"k{i}") for i in range(2, 4)])
        assert [r.status_code for r in replies] == [401] * 3, [r.text for r in replies]
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM responses")).scalar_one() == 1
    finally:
        engine.dispose()


async def test_a_participant_locked_elsewhere_holds_up_only_their_own_response(fresh_db: URL, tmp_path: Path) -> None:
    """A group waits a second at most for a participant's lock; then each of its requests is stored on its
    own, so only the locked participant's waits, and requests of other lanes never wait for it at all."""
    engine = create_engine(fresh_db)
    try:
        async with running(fresh_db, tmp_path) as (_, admin):
            collector = await pal_study(admin, 4, webhook=False)
            await create_study(admin, ADMIN_TOKEN, key="other")
            assert (await admin.post("/api/v1/studies/other/participants", json={
                "external_id": "Q01", "enrolled_at": (datetime.now(UTC) - timedelta(days=2)).isoformat()})
                    ).status_code == 201
            with held(engine, "P01"):
                blocked = asyncio.ensure_future(admin.post(URL_OF, json=baseline("P01", 1), headers=auth(collector)))
                await until(lambda: lock_waits(engine) == 1, "P01's request to wait for the lock")
                others = [asyncio.ensure_future(admin.post(URL_OF, json=baseline(f"P{i:02d}", i),
                                                           headers=auth(collector))) for i in (2, 3, 4)]
                elsewhere = asyncio.ensure_future(admin.post("/api/v1/studies/other/responses",
                                                             json=baseline("Q01", 9)))  # another lane
                done, _ = await asyncio.wait({*others, elsewhere}, timeout=60)
                assert done == {*others, elsewhere} and not blocked.done()  # all of them while P01 is locked
                assert [t.result().status_code for t in (*others, elsewhere)] == [201] * 4
            assert (await blocked).status_code == 201
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM responses")).scalar_one() == 5
    finally:
        engine.dispose()
