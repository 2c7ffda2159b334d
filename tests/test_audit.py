"""The audit trail: every change with who, when, before and after; append-only; no contact values."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from app.audit.models import AUDITED
from tests.conftest import ADMIN_TOKEN
from tests.factories import auth, create_study, create_token, valid_answers

pytestmark = pytest.mark.anyio

BASE = "/api/v1/studies/pal"


async def token_id(admin: httpx.AsyncClient, label: str) -> str:
    items = (await admin.get("/api/v1/tokens")).json()["items"]
    return str(next(t["id"] for t in items if t["label"] == label))


async def audit(client: httpx.AsyncClient, token: str, **params: Any) -> list[dict[str, Any]]:
    r = await client.get(f"{BASE}/audit", params=params, headers=auth(token))
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def test_every_coordinator_change_is_recorded_with_before_and_after(admin: httpx.AsyncClient,
                                                                         connection: Connection) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    coordinator = await create_token(admin, ADMIN_TOKEN, "coordinator")
    actor = await token_id(admin, "test coordinator")
    enrolled = datetime.now(UTC) - timedelta(days=2)
    r = await admin.post(f"{BASE}/participants", headers=auth(coordinator), json={
        "external_id": "A1", "enrolled_at": enrolled.isoformat(), "contact": {"email": "a1@example.org"}})
    participant_id = r.json()["id"]
    answers = valid_answers("baseline", random.Random(1))
    rid = (await admin.post(f"{BASE}/responses", headers=auth(coordinator), json={
        "external_id": "A1", "wave": "baseline", "answers": answers})).json()["id"]
    await admin.patch(f"{BASE}/responses/{rid}", headers=auth(coordinator),
                      json={"answers": {"age": 61}, "reason": "misread the form"})
    await admin.post(f"{BASE}/participants/A1/withdraw", headers=auth(coordinator),
                     json={"reason": "moved abroad", "erase_contact": True})

    entries = await audit(admin, coordinator, actor=actor)
    kinds = {(e["table"], e["action"]) for e in entries}
    assert {("participants", "INSERT"), ("schedules", "INSERT"), ("participant_contacts", "INSERT"),
            ("responses", "INSERT"), ("responses", "UPDATE"), ("response_corrections", "INSERT"),
            ("participants", "UPDATE"), ("participant_contacts", "DELETE")} <= kinds
    assert all(e["actor"] == actor for e in entries)

    correction = next(e for e in entries if e["table"] == "responses" and e["action"] == "UPDATE"
                      and "answers" in (e["changed"] or []))
    assert correction["row_id"] == rid
    assert correction["before"]["answers"]["age"] == answers["age"] and correction["after"]["answers"]["age"] == 61
    withdrawal = next(e for e in entries if e["table"] == "participants" and e["action"] == "UPDATE"
                      and "status" in (e["changed"] or []) and e["after"]["status"] == "withdrawn")
    assert withdrawal["row_id"] == participant_id and withdrawal["before"]["status"] == "active"
    assert withdrawal["after"]["withdraw_reason"] == "moved abroad"

    contact_rows = [e for e in entries if e["table"] == "participant_contacts"]
    assert all((e["after"] or e["before"])["sealed"] == "[redacted]" for e in contact_rows)
    whole_log = connection.execute(text("SELECT string_agg(before::text || after::text, '') FROM audit_log")).scalar()
    assert "a1@example.org" not in (whole_log or "")
    assert ([e["id"] for e in entries] == sorted((e["id"] for e in entries), reverse=True))  # newest first


async def test_tokens_are_audited_without_their_hash(admin: httpx.AsyncClient) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    r = await admin.post("/api/v1/tokens", json={"role": "analyst", "label": "audited"})
    made = r.json()
    await admin.delete(f"/api/v1/tokens/{made['id']}")
    entries = (await admin.get("/api/v1/audit", params={"table": "api_tokens", "row_id": made["id"]})).json()["items"]
    assert [e["action"] for e in entries] == ["UPDATE", "INSERT"]
    assert entries[1]["after"]["secret_hash"] == "[redacted]" and entries[0]["changed"] == ["revoked_at"]
    assert entries[1]["after"]["role"] == "analyst"


async def test_bulk_imports_are_audited_per_row(admin: httpx.AsyncClient) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    rows = [{"external_id": f"B{i}", "enrolled_at": "2026-01-05T10:00:00Z"} for i in range(25)]
    assert (await admin.post(f"{BASE}/participants:import", json=rows)).json()["created"] == 25
    inserted = await audit(admin, ADMIN_TOKEN, table="participants", action="INSERT", limit=500)
    assert len(inserted) == 25 and all(e["actor"] for e in inserted)
    schedules = await audit(admin, ADMIN_TOKEN, table="schedules", action="INSERT", limit=500)
    assert len(schedules) == 75


async def test_the_audit_log_cannot_be_altered(admin: httpx.AsyncClient, connection: Connection) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    assert connection.execute(text("SELECT count(*) FROM audit_log")).scalar_one() > 0
    for statement in ("UPDATE audit_log SET actor = 'someone else'", "DELETE FROM audit_log",
                      "TRUNCATE audit_log"):
        savepoint = connection.begin_nested()
        with pytest.raises(DBAPIError, match="append-only"):
            connection.execute(text(statement))
        savepoint.rollback()
    assert connection.execute(text("SELECT count(*) FROM audit_log WHERE actor = 'someone else'")).scalar_one() == 0


async def test_audit_paging_filters_and_roles(admin: httpx.AsyncClient) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    rows = [{"external_id": f"C{i}", "enrolled_at": "2026-01-05T10:00:00Z"} for i in range(7)]
    await admin.post(f"{BASE}/participants:import", json=rows)
    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"table": "participants", "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await admin.get(f"{BASE}/audit", params=params)).json()
        seen += [e["id"] for e in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 7
    since = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert (await admin.get(f"{BASE}/audit", params={"since": since})).json()["items"] == []
    for role in ("analyst", "collector"):
        token = await create_token(admin, ADMIN_TOKEN, role)
        assert (await admin.get(f"{BASE}/audit", headers=auth(token))).status_code == 403
    coordinator = await create_token(admin, ADMIN_TOKEN, "coordinator")
    assert (await admin.get("/api/v1/audit", headers=auth(coordinator))).status_code == 403
    assert (await admin.get(f"{BASE}/audit", params={"table": "bogus"})).status_code == 422


def test_every_audited_table_has_its_triggers(connection: Connection) -> None:
    found = {(r.table, r.name) for r in connection.execute(text(
        "SELECT c.relname AS table, t.tgname AS name FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "WHERE NOT t.tgisinternal"))}
    for table, *_ in AUDITED:
        assert {(table, "audit_insert"), (table, "audit_update"), (table, "audit_delete")} <= found, table
    assert ("audit_log", "audit_log_append_only") in found and ("audit_log", "audit_log_no_truncate") in found


def test_reminder_send_updates_are_audited_as_the_generic_trigger_would(connection: Connection) -> None:
    """reminder_sends has its own, leaner update trigger (a claim records 1,000 decisions at once):
    its entries are the generic ones, `changed` in key order, unchanged rows left out."""
    connection.execute(text("SELECT set_config('cohort.actor', 'tester', true)"))
    study = connection.execute(text("INSERT INTO studies (key, name, timezone, settings) "
                                    "VALUES ('lean', 'Lean', 'UTC', '{}') RETURNING id")).scalar_one()
    person = connection.execute(text(
        "INSERT INTO participants (study_id, external_id, status, enrolled_at, timezone) "
        "VALUES (:s, 'L1', 'active', now(), 'UTC') RETURNING id"), {"s": study}).scalar_one()
    connection.execute(text(
        "INSERT INTO schedules (study_id, participant_id, wave, opens_at, due_at, closes_at, status) "
        "VALUES (:s, :p, 'baseline', now(), now(), now() + interval '9 days', 'scheduled')"), {"s": study, "p": person})
    sends = connection.execute(text(
        "INSERT INTO reminder_sends (study_id, participant_id, wave, kind, due_at, status, attempts) "
        "SELECT :s, :p, 'baseline', k, now(), 'pending', 0 FROM unnest(ARRAY['invitation', 'reminder_1']) k "
        "RETURNING id"), {"s": study, "p": person}).scalars().all()
    first = connection.execute(text("SELECT max(id) FROM audit_log")).scalar_one()
    connection.execute(text("UPDATE reminder_sends SET status = 'skipped', last_error = 'why', attempts = 2, "
                            "sent_at = now() WHERE id = :id"), {"id": sends[0]})
    connection.execute(text("UPDATE reminder_sends SET status = status WHERE participant_id = :p"), {"p": person})
    entries = connection.execute(text(
        "SELECT a.actor, a.row_id, a.action, a.study_id, a.changed, cohort_changed(a.before, a.after) AS generic, "
        "a.after = to_jsonb(r) AS after_is_row, a.before ->> 'status' AS was FROM audit_log a "
        "JOIN reminder_sends r ON r.id::text = a.row_id WHERE a.id > :first AND a.table_name = 'reminder_sends'"),
        {"first": first}).all()
    assert len(entries) == 1
    entry = entries[0]
    assert (entry.actor, entry.row_id, entry.action, entry.study_id) == ("tester", str(sends[0]), "UPDATE", study)
    assert entry.changed == entry.generic == ["attempts", "last_error", "sent_at", "status"]
    assert entry.after_is_row and entry.was == "pending"
