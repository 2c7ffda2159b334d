"""The lean request path of POST /responses: what it caches must never outlive the truth.

A token this process has seen is not looked up again before the request's work, yet a revoked
one is refused on the very next request; a study's key is checked against a token's scope without
a round trip, yet a new codebook revision validates the very next response.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import bindparam, create_engine, func, literal, select, text, update
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError

from app.core import db as db_module
from app.core.db import Database, confirming, expect_live_token, transaction, with_commit
from app.responses import repository as responses_repo
from app.tokens import service as tokens
from app.tokens.models import ApiToken
from tests.conftest import ADMIN_TOKEN, client_for, clone_database, drop_database, make_settings
from tests.factories import auth, create_study, create_token, minimal_codebook, valid_answers
from tests.written import WRITTEN
from tests.written import written as tables_written

pytestmark = pytest.mark.anyio


async def enrol(admin: httpx.AsyncClient, key: str, *external_ids: str) -> None:
    enrolled = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    for external_id in external_ids:
        r = await admin.post(f"/api/v1/studies/{key}/participants",
                             json={"external_id": external_id, "enrolled_at": enrolled})
        assert r.status_code == 201, r.text


async def token_id(admin: httpx.AsyncClient, label: str) -> str:
    items = (await admin.get("/api/v1/tokens")).json()["items"]
    return str(next(t["id"] for t in items if t["label"] == label))


def baseline(external_id: str, seed: int) -> dict[str, Any]:
    return {"external_id": external_id, "wave": "baseline", "answers": valid_answers("baseline", random.Random(seed))}


async def test_a_revoked_token_is_refused_on_the_very_next_response(admin: httpx.AsyncClient) -> None:
    await create_study(admin, ADMIN_TOKEN, key="lean")
    await enrol(admin, "lean", "P1", "P2")
    collector = await create_token(admin, ADMIN_TOKEN, "collector")
    r = await admin.post("/api/v1/studies/lean/responses", json=baseline("P1", 1), headers=auth(collector))
    assert r.status_code == 201, r.text  # the token is now known to this process
    assert (await admin.delete(f"/api/v1/tokens/{await token_id(admin, 'test collector')}")).status_code == 204

    r = await admin.post("/api/v1/studies/lean/responses", json=baseline("P2", 2),
                         headers={**auth(collector), "Idempotency-Key": "after-revocation"})
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    stored = (await admin.get("/api/v1/studies/lean/responses", params={"external_id": "P2"})).json()["items"]
    assert stored == []
    # and everywhere else at once, not only on the hot path
    assert (await admin.get("/api/v1/studies/lean/instruments", headers=auth(collector))).status_code == 401


async def test_the_audit_names_a_known_token(admin: httpx.AsyncClient) -> None:
    await create_study(admin, ADMIN_TOKEN, key="lean")
    await enrol(admin, "lean", "P1", "P2")
    collector = await create_token(admin, ADMIN_TOKEN, "collector")
    actor = await token_id(admin, "test collector")
    for n, external_id in enumerate(("P1", "P2")):  # the second time, the token is known
        r = await admin.post("/api/v1/studies/lean/responses", json=baseline(external_id, n), headers=auth(collector))
        assert r.status_code == 201, r.text
    entries = (await admin.get("/api/v1/studies/lean/audit", params={"actor": actor})).json()["items"]
    inserted = [e for e in entries if e["table"] == "responses" and e["action"] == "INSERT"]
    completed = [e for e in entries if e["table"] == "schedules" and e["action"] == "UPDATE"]
    assert len(inserted) == 2 and len(completed) == 2


async def test_a_new_codebook_revision_validates_the_very_next_response(admin: httpx.AsyncClient) -> None:
    r = await admin.post("/api/v1/studies", json={"key": "mini", "name": "Mini", "timezone": "UTC",
                                                  "codebook": minimal_codebook()})
    assert r.status_code == 201, r.text
    await enrol(admin, "mini", "M1", "M2", "M3")
    answers = {"drinks_week": 150, "smoker": False}
    r = await admin.post("/api/v1/studies/mini/responses", json={"external_id": "M1", "wave": "intake",
                                                                  "answers": answers})
    assert r.status_code == 201, r.text

    stricter = minimal_codebook()
    stricter["instruments"][0]["items"][0]["max"] = 100
    assert (await admin.put("/api/v1/studies/mini/codebook", json=stricter)).status_code == 200
    r = await admin.post("/api/v1/studies/mini/responses", json={"external_id": "M2", "wave": "intake",
                                                                  "answers": answers})
    assert r.status_code == 422, r.text
    assert [(e["loc"], e["code"]) for e in r.json()["errors"]] == [(["answers", "drinks_week"], "range")]

    assert (await admin.put("/api/v1/studies/mini/codebook", json=minimal_codebook())).status_code == 200
    r = await admin.post("/api/v1/studies/mini/responses", json={"external_id": "M3", "wave": "intake",
                                                                  "answers": answers})
    assert r.status_code == 201, r.text


async def test_a_scoped_token_stays_in_its_study_before_its_body_is_read(admin: httpx.AsyncClient) -> None:
    await create_study(admin, ADMIN_TOKEN, key="ours")
    await create_study(admin, ADMIN_TOKEN, key="theirs")
    await enrol(admin, "theirs", "T1")
    scoped = await create_token(admin, ADMIN_TOKEN, "collector", study_key="ours")
    # the other study's key is known to the process by now (the admin enrolled there)
    assert (await admin.post("/api/v1/studies/theirs/responses", json=baseline("T1", 1))).status_code == 201
    for body in (baseline("T1", 2), {}):
        r = await admin.post("/api/v1/studies/theirs/responses", json=body, headers=auth(scoped))
        assert r.status_code == 403, r.text
    for body in (baseline("T1", 2), {}):
        r = await admin.post("/api/v1/studies/nowhere/responses", json=body, headers=auth(scoped))
        assert r.status_code == 404, r.text
    r = await admin.post("/api/v1/studies/ours/responses", json={}, headers=auth(scoped))
    assert r.status_code == 422


async def test_requests_the_lean_handler_declines_get_the_declared_routes_answers(admin: httpx.AsyncClient) -> None:
    """The lean handler answers the usual request; anything else is the declared route's, errors included."""
    await create_study(admin, ADMIN_TOKEN, key="lean")
    await enrol(admin, "lean", "P1", "P2")
    url = "/api/v1/studies/lean/responses"
    declined = [
        ({"external_id": "P1", "wave": "baseline"}, {}, ["answers"]),
        ({**baseline("P1", 1), "status": "done"}, {}, ["status"]),
        (baseline("P1", 1), {"Idempotency-Key": "k" * 256}, ["header", "Idempotency-Key"]),
    ]
    for body, headers, field in declined:
        r = await admin.post(url, json=body, headers=headers)
        assert r.status_code == 422, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert field in [e["loc"] for e in r.json()["errors"]], r.text
    r = await admin.post(f"/api/v1/studies/{'k' * 64}/responses", json=baseline("P1", 1))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"][-1] == "key", r.text
    assert (await admin.get(url)).json()["items"] == []  # nothing was stored by any of them

    for n, content_type in enumerate(("application/json; charset=utf-8", "application/vnd.cohort+json")):
        r = await admin.post(url, content=httpx.Request("POST", "/", json=baseline(f"P{n + 1}", n)).content,
                             headers={"Content-Type": content_type})
        assert r.status_code == 201, r.text


async def test_the_lean_handler_declines_before_any_work() -> None:
    """What the lean handler does not recognise it leaves alone: no session, no token lookup (the
    request below has no application behind it at all)."""
    from starlette.requests import Request

    from app.responses.router import _submit_lean, submit

    assert getattr(submit, "cohort_lean", None) is _submit_lean

    async def call(body: bytes, headers: dict[str, str], key: str = "lean") -> Any:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": f"/api/v1/studies/{key}/responses",
                 "path_params": {"key": key}, "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        return await _submit_lean(Request(scope, receive))

    valid = httpx.Request("POST", "/", json=baseline("P1", 1)).content
    json_type = {"Content-Type": "application/json"}
    assert await call(b'{"external_id": "P1"}', json_type) is None
    assert await call(b"not json", json_type) is None
    assert await call(valid, {**json_type, "Idempotency-Key": ""}) is None
    assert await call(valid, {"Content-Type": "text/plain"}) is None
    assert await call(valid, json_type, key="k" * 64) is None
    with pytest.raises(KeyError, match="app"):  # a valid request goes on to the work, which needs the application
        await call(valid, {**json_type, "Authorization": "Bearer x"})


@pytest.fixture
async def committing(fresh_db: URL, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, URL]]:
    """The app on a database of its own: real commits, so the writes sent with the COMMIT take the
    pipelined path (the other tests here run inside a rolled-back transaction)."""
    from app.main import create_app

    application = create_app(make_settings(fresh_db, tmp_path))
    async with application.router.lifespan_context(application), client_for(application, ADMIN_TOKEN) as client:
        yield client, fresh_db


async def test_writes_sent_with_the_commit_are_all_committed(committing: tuple[httpx.AsyncClient, URL]) -> None:
    admin, url = committing
    await create_study(admin, ADMIN_TOKEN, key="lean")
    enrolled = (datetime.now(UTC) - timedelta(days=370)).isoformat()
    assert (await admin.post("/api/v1/studies/lean/participants",
                             json={"external_id": "P1", "enrolled_at": enrolled})).status_code == 201
    collector = await create_token(admin, ADMIN_TOKEN, "collector")
    hook = await admin.post("/api/v1/studies/lean/webhooks", json={"url": "https://93.184.215.14/hook",
                                                                   "events": ["response.completed"]})
    assert hook.status_code == 201, hook.text
    bodies = {wave: {"external_id": "P1", "wave": wave, "answers": valid_answers(wave, random.Random(n))}
              for n, wave in enumerate(("baseline", "month6", "month12"))}
    first = await admin.post("/api/v1/studies/lean/responses", json=bodies["baseline"],
                             headers={**auth(collector), "Idempotency-Key": "k-baseline"})
    assert first.status_code == 201, first.text
    again = await admin.post("/api/v1/studies/lean/responses", json=bodies["baseline"],
                             headers={**auth(collector), "Idempotency-Key": "k-baseline"})
    assert (again.status_code, again.json(), again.headers.get("idempotent-replayed")) == (201, first.json(), "true")
    for wave in ("month6", "month12"):
        r = await admin.post("/api/v1/studies/lean/responses", json=bodies[wave], headers=auth(collector))
        assert r.status_code == 201, r.text

    participant = (await admin.get("/api/v1/studies/lean/participants/P1")).json()
    assert participant["status"] == "completed"  # the final wave's status change, written with the commit
    assert {s["wave"]: s["status"] for s in participant["schedule"]} == {
        "baseline": "completed", "month6": "completed", "month12": "completed"}
    retention = (await admin.get("/api/v1/studies/lean/retention")).json()
    assert all(w["completed"] == 1 for w in retention["waves"])
    engine = create_engine(url)
    with engine.connect() as conn:
        keys = conn.execute(text("SELECT count(*) FROM idempotency_keys WHERE key = 'k-baseline'")).scalar_one()
        audited = conn.execute(text(
            "SELECT table_name, action, count(*) FROM audit_log WHERE table_name IN ('responses', 'schedules', "
            "'participants') AND action = 'UPDATE' OR table_name = 'responses' GROUP BY 1, 2")).all()
        events = conn.execute(text("SELECT payload FROM webhook_deliveries WHERE event = 'response.completed' "
                                   "ORDER BY seq")).scalars().all()
    engine.dispose()
    assert keys == 1
    assert [e["data"]["wave"] for e in events] == ["baseline", "month6", "month12"]
    assert {(t, a): n for t, a, n in audited} == {("responses", "INSERT"): 3, ("schedules", "UPDATE"): 3,
                                                 ("participants", "UPDATE"): 1}


def test_a_confirmation_left_to_a_first_statement_is_checked_before_commit(database: Database) -> None:
    refused = RuntimeError("the token was not confirmed")
    with pytest.raises(RuntimeError, match="not confirmed"), transaction(database) as session:
        expect_live_token(session, uuid.uuid4(), lambda connection, token_id: True,
                          literal(1), lambda: refused)
        confirmation = confirming(session)
        assert confirmation is not None
        session.execute(select(confirmation.column))  # carried, but its value never passed to confirmed()


_REFUSED_BY_A_CHECK = update(ApiToken).where(ApiToken.label == bindparam("label")).values(role="nobody")


def test_a_write_sent_with_the_commit_that_fails_commits_nothing(fresh_db: URL, tmp_path: Path) -> None:
    db = Database.from_settings(make_settings(fresh_db, tmp_path))
    try:
        with pytest.raises(IntegrityError), transaction(db) as session:  # the driver's error, as SQLAlchemy's
            tokens.create(session, role="collector", label="doomed")
            with_commit(session, _REFUSED_BY_A_CHECK, {"label": "doomed"}, contended=True)
        with transaction(db) as session:
            assert session.scalar(select(func.count()).where(ApiToken.label == "doomed")) == 0
    finally:
        db.dispose()


async def test_a_first_baseline_after_a_follow_up_still_updates_what_the_follow_up_carries(
        admin: httpx.AsyncClient) -> None:
    await create_study(admin, ADMIN_TOKEN, key="lean")
    enrolled = (datetime.now(UTC) - timedelta(days=200)).isoformat()
    assert (await admin.post("/api/v1/studies/lean/participants",
                             json={"external_id": "P1", "enrolled_at": enrolled})).status_code == 201
    month6 = await admin.post("/api/v1/studies/lean/responses", json={
        "external_id": "P1", "wave": "month6", "answers": valid_answers("month6", random.Random(1))})
    assert month6.status_code == 201 and month6.json()["derived"]["aud_severity"] is None
    first_baseline = await admin.post("/api/v1/studies/lean/responses", json=baseline("P1", 2))
    assert first_baseline.status_code == 201
    severity = first_baseline.json()["derived"]["aud_severity"]
    assert severity is not None
    stored = (await admin.get(f"/api/v1/studies/lean/responses/{month6.json()['id']}")).json()
    assert stored["derived"]["aud_severity"] == severity  # carried from the baseline that came later


async def test_a_response_stored_meanwhile_by_a_writer_without_the_lock_is_a_409(
        committing: tuple[httpx.AsyncClient, URL], monkeypatch: pytest.MonkeyPatch) -> None:
    # A bulk import stores responses without taking the participant's lock: a first submission
    # racing one finds the wave taken by the unique (participant, wave) at commit, not a 500.
    from app.responses import repository

    admin, url = committing
    await create_study(admin, ADMIN_TOKEN, key="lean")
    await enrol(admin, "lean", "P1")
    assert (await admin.post("/api/v1/studies/lean/responses", json=baseline("P1", 1))).status_code == 201
    monkeypatch.setattr(repository, "stored_of_rows", lambda rows: {})  # the stored baseline goes unseen
    r = await admin.post("/api/v1/studies/lean/responses", json=baseline("P1", 2),
                         headers={"Idempotency-Key": "raced"})
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    monkeypatch.undo()
    engine = create_engine(url)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM responses")).scalar_one()
        keys = conn.execute(text("SELECT count(*) FROM idempotency_keys WHERE key = 'raced'")).scalar_one()
    engine.dispose()
    assert (stored, keys) == (1, 0)


async def _responses_written(url: URL, tmp_path: Path) -> tuple[dict[str, list[str]], list[list[str]]]:
    """Three waves of one participant (the first with an Idempotency-Key, the last completes them), a
    partial response and its merge for another: what the database then holds, and the SQL of each
    pipeline sent with a COMMIT."""
    from app.main import create_app

    sent: list[list[str]] = []
    send = db_module._send_with_commit

    def recording(connection: Any, statements: Any) -> None:
        sent.append([str(statement) for statement, _ in statements])
        send(connection, statements)

    application = create_app(make_settings(url, tmp_path))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(db_module, "_send_with_commit", recording)
        async with (application.router.lifespan_context(application),
                    client_for(application, ADMIN_TOKEN) as admin):
            await create_study(admin, ADMIN_TOKEN, key="lean")
            enrolled = (datetime.now(UTC) - timedelta(days=370)).isoformat()
            for person in ("P1", "P2"):
                assert (await admin.post("/api/v1/studies/lean/participants",
                                         json={"external_id": person, "enrolled_at": enrolled})).status_code == 201
            collector = await create_token(admin, ADMIN_TOKEN, "collector")
            assert (await admin.post("/api/v1/studies/lean/webhooks", json={
                "url": "https://93.184.215.14/hook", "events": ["response.completed"]})).status_code == 201
            sent.clear()
            for n, wave in enumerate(("baseline", "month6", "month12")):
                r = await admin.post("/api/v1/studies/lean/responses", headers={
                    **auth(collector), **({"Idempotency-Key": "k-baseline"} if wave == "baseline" else {})},
                    json={"external_id": "P1", "wave": wave, "answers": valid_answers(wave, random.Random(n))})
                assert r.status_code == 201, r.text
            answers = list(valid_answers("baseline", random.Random(7), primary_group="aa_12step").items())
            for n, (part, given) in enumerate(((answers[:10], "partial"), (answers[10:], "complete"))):
                r = await admin.post("/api/v1/studies/lean/responses", headers=auth(collector), json={
                    "external_id": "P2", "wave": "baseline", "answers": dict(part), "status": given})
                assert r.status_code == (201, 200)[n], r.text
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            written = tables_written(conn)
            # the times are masked above; the ones the writes copy must still agree
            written["times copied"] = [str(n) for n in conn.execute(text(
                "SELECT count(*) FROM schedules s JOIN responses r ON r.participant_id = s.participant_id "
                "AND r.wave = s.wave WHERE r.status = 'complete' AND s.completed_at IS DISTINCT FROM r.completed_at "
                "UNION ALL SELECT count(*) FROM idempotency_keys k JOIN responses r ON r.id = k.resource_id "
                "WHERE k.created_at IS DISTINCT FROM r.received_at")).scalars()]
    finally:
        engine.dispose()
    return written, sent


async def test_the_writes_folded_into_one_call_are_those_the_pipeline_sends(template_db: URL, tmp_path: Path) -> None:
    urls = [clone_database(template_db), clone_database(template_db)]
    try:
        folded, folded_sent = await _responses_written(urls[0], tmp_path)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(db_module, "_folds", {})  # every write its own statement
            pipelined, pipelined_sent = await _responses_written(urls[1], tmp_path)
    finally:
        for url in urls:
            drop_database(url)
    # each first complete response's writes went as one call; the partial one and the merge as before
    assert [len(s) for s in folded_sent] == [1, 1, 1, 1, 2]
    assert all("cohort_submit_close" in s[0] for s in folded_sent[:3])
    assert "cohort_submit_close" not in " ".join(folded_sent[3] + folded_sent[4])
    assert [len(s) for s in pipelined_sent] == [4, 3, 4, 1, 2]
    assert folded_sent[3:] == pipelined_sent[3:]
    assert folded["audit_log"] and folded["idempotency_keys"] and folded["webhook_deliveries"]
    for table in WRITTEN:
        assert folded[table] == pipelined[table], table
    assert folded["times copied"] == pipelined["times copied"] == ["0", "0"]


async def test_a_response_stored_meanwhile_is_a_conflict_when_the_writes_are_one_call(
        committing: tuple[httpx.AsyncClient, URL]) -> None:
    admin, url = committing
    await create_study(admin, ADMIN_TOKEN, key="lean")
    enrolled = (datetime.now(UTC) - timedelta(days=10)).isoformat()
    assert (await admin.post("/api/v1/studies/lean/participants",
                             json={"external_id": "P1", "enrolled_at": enrolled})).status_code == 201
    engine = create_engine(url)
    send = db_module._send_with_commit

    def an_import_first(connection: Any, statements: Any) -> None:
        # a writer that does not take the participant's lock stores the same wave just before the commit
        if "cohort_submit_close" in str(statements[0][0]):
            given = statements[0][1]
            with engine.begin() as other:
                other.execute(responses_repo._INSERT,
                              {**{k[2:]: v for k, v in given.items() if k.startswith("r_")}, "id": uuid.uuid4()})
        send(connection, statements)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(db_module, "_send_with_commit", an_import_first)
            r = await admin.post("/api/v1/studies/lean/responses", headers={"Idempotency-Key": "k1"},
                                 json=baseline("P1", 1))
        assert r.status_code == 409, r.text
        assert "stored meanwhile" in r.json()["detail"]
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM idempotency_keys")).scalar_one() == 0
            assert conn.execute(text("SELECT count(*) FROM webhook_deliveries")).scalar_one() == 0
            assert conn.execute(text("SELECT count(*) FROM schedules WHERE status = 'completed'")).scalar_one() == 0
    finally:
        engine.dispose()
