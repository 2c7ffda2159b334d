"""Contact data: sealed at rest, never logged, erasable; keys rotate; writes are rate limited."""

from __future__ import annotations

import logging
import random
import re
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import Connection, text
from sqlalchemy.engine import Engine

from app.core.crypto import settings_sealer
from app.core.db import Database, transaction
from app.main import create_app
from app.privacy.tasks import rotate
from app.studies.service import pseudonymiser, system_context
from tests.conftest import ADMIN_TOKEN, SECRET_KEY, client_for, make_settings
from tests.factories import create_study, valid_answers
from tests.smtp import SmtpServer

pytestmark = pytest.mark.anyio

BASE = "/api/v1/studies/pal"
NY = ZoneInfo("America/New_York")
EMAIL = "erase.me.please@example.org"
PHONE = "+1 555 0199"


def everything_in(connection: Connection) -> str:
    """Every row of every table as text: what a dump of the database would show."""
    tables = connection.execute(text(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars().all()
    parts = []
    for table in tables:
        rows = connection.execute(text(f'SELECT t::text FROM "{table}" t')).scalars().all()
        parts += [str(r) for r in rows]
        for column in connection.execute(text(
                "SELECT column_name FROM information_schema.columns WHERE table_name = :t AND data_type = 'bytea'"),
                {"t": table}).scalars():
            blobs = connection.execute(text(f'SELECT "{column}" FROM "{table}"')).scalars().all()
            parts += [bytes(b).decode("latin-1") for b in blobs if b is not None]
    return "\n".join(parts)


async def test_an_erased_participant_leaves_no_trace(shared_engine: Engine, database: Database, tmp_path: Path,
                                                     connection: Connection, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with SmtpServer() as smtp:
        app = create_app(make_settings(shared_engine.url, tmp_path, smtp_url=smtp.url), database=database)
        async with app.router.lifespan_context(app), client_for(app, ADMIN_TOKEN) as api:
            await create_study(api, ADMIN_TOKEN, key="pal", timezone="America/New_York")
            day0 = (datetime.now(UTC) - timedelta(days=20)).date()
            r = await api.post(f"{BASE}/participants", headers={"Idempotency-Key": "enrol-x"}, json={
                "external_id": "X1", "enrolled_at": datetime.combine(day0, time(10), tzinfo=NY).isoformat(),
                "contact": {"email": EMAIL, "phone": PHONE, "name": "Ursula Unique"}})
            assert r.status_code == 201 and r.json()["contact"]["email"] == EMAIL
            run = await api.post(f"{BASE}/reminders:run",
                                 params={"now": datetime.combine(day0, time(12), tzinfo=NY).isoformat()})
            assert run.json()["sent"] == 1 and smtp.capture.to(EMAIL)  # it was used, then...
            await api.post(f"{BASE}/responses", json={"external_id": "X1", "wave": "baseline",
                                                      "answers": valid_answers("baseline", random.Random(1))})
            dump = everything_in(connection)
            assert EMAIL not in dump and PHONE not in dump and "Ursula" not in dump  # sealed at rest
            r = await api.post(f"{BASE}/participants/X1/withdraw",
                               json={"reason": "asked us to forget her", "erase_contact": True})
            assert r.status_code == 200 and r.json()["contact"] is None
            assert connection.execute(text("SELECT count(*) FROM participant_contacts")).scalar_one() == 0
            assert connection.execute(text("SELECT count(*) FROM idempotency_keys")).scalar_one() == 0
    # what the service logs (the test's own SMTP server, aiosmtpd's "mail.log", logs the mail it receives)
    logged = "\n".join(record.getMessage() for record in caplog.records if not record.name.startswith("mail"))
    assert logged, "the workflow should have logged something"
    assert EMAIL not in logged and PHONE not in logged and "Ursula" not in logged
    assert EMAIL not in everything_in(connection)


async def test_withdrawal_can_delete_answers_when_the_study_says_so(admin: httpx.AsyncClient,
                                                                    connection: Connection) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    r = await admin.patch(BASE, json={"withdrawal_policy": "delete_responses"})
    assert r.status_code == 200 and r.json()["withdrawal_policy"] == "delete_responses"
    await admin.post(f"{BASE}/participants", json={"external_id": "D1",
                                                   "enrolled_at": datetime.now(UTC).isoformat()})
    answers = valid_answers("baseline", random.Random(2), age=73)
    rid = (await admin.post(f"{BASE}/responses", json={"external_id": "D1", "wave": "baseline",
                                                       "answers": answers})).json()["id"]
    await admin.post(f"{BASE}/participants/D1/withdraw", json={"reason": "withdrew consent"})
    assert (await admin.get(f"{BASE}/responses/{rid}")).status_code == 404
    deletion = (await admin.get(f"{BASE}/audit", params={"table": "responses", "action": "DELETE"})).json()["items"]
    assert len(deletion) == 1
    assert deletion[0]["before"] == {"id": rid, "redacted": "deleted under the withdrawal policy"}
    assert connection.execute(text("SELECT count(*) FROM responses")).scalar_one() == 0
    schedule = (await admin.get(f"{BASE}/participants/D1")).json()["schedule"]
    assert schedule[0]["status"] == "withdrawn" and schedule[0]["completed_at"] is None
    r = await admin.patch(BASE, json={"withdrawal_policy": "forget_everything"})
    assert r.status_code == 422


async def test_keys_rotate_without_changing_pseudonyms_or_breaking_links(
    shared_engine: Engine, database: Database, tmp_path: Path, connection: Connection
) -> None:
    old = make_settings(shared_engine.url, tmp_path)
    app = create_app(old, database=database)
    async with app.router.lifespan_context(app), client_for(app, ADMIN_TOKEN) as api:
        await create_study(api, ADMIN_TOKEN, key="pal")
        for i in range(3):
            await api.post(f"{BASE}/participants", json={"external_id": f"K{i}",
                                                         "enrolled_at": datetime.now(UTC).isoformat(),
                                                         "contact": {"email": f"k{i}@example.org"}})
    with transaction(database) as session:
        before = pseudonymiser(session, system_context(session, "pal").study, settings_sealer(old))("K1")
    from app.reminders.links import LinkTarget, make_token, read_token

    link = make_token(SECRET_KEY, LinkTarget("pal", "p", "baseline", datetime.now(UTC) + timedelta(days=3)))

    new_key = "a-brand-new-secret-key-0123456789"
    rotated = make_settings(shared_engine.url, tmp_path, secret_key=new_key, old_secret_keys=SECRET_KEY)
    counts = rotate(database, settings_sealer(rotated))
    assert counts["participant contacts"] == 3 and counts["study pseudonym keys"] == 1
    assert rotate(database, settings_sealer(rotated)) == dict.fromkeys(counts, 0)  # nothing left to do

    only_new = make_settings(shared_engine.url, tmp_path, secret_key=new_key)
    app = create_app(only_new, database=database)
    async with app.router.lifespan_context(app), client_for(app, ADMIN_TOKEN) as api:
        r = await api.get(f"{BASE}/participants/K1")
        assert r.status_code == 200 and r.json()["contact"]["email"] == "k1@example.org"
    with transaction(database) as session:
        after = pseudonymiser(session, system_context(session, "pal").study, settings_sealer(only_new))("K1")
    assert after == before
    assert read_token([new_key, SECRET_KEY], link, datetime.now(UTC)).study_key == "pal"
    blobs = connection.execute(text("SELECT sealed FROM participant_contacts")).scalars().all()
    assert all(not settings_sealer(only_new).needs_rotation(bytes(b)) for b in blobs)


async def test_writes_are_rate_limited_per_token(shared_engine: Engine, database: Database, tmp_path: Path) -> None:
    app = create_app(make_settings(shared_engine.url, tmp_path, rate_limit_per_minute=5), database=database)
    async with app.router.lifespan_context(app), client_for(app, ADMIN_TOKEN) as api:
        codes = [(await api.post("/api/v1/studies", json={"key": f"rl-{i}", "name": "n", "timezone": "UTC"}))
                 for i in range(7)]
        assert [r.status_code for r in codes] == [201] * 5 + [429] * 2
        limited = codes[-1]
        assert limited.headers["content-type"].startswith("application/problem+json")
        assert 1 <= int(limited.headers["retry-after"]) <= 61
        assert (await api.get("/api/v1/studies")).status_code == 200  # reads are not limited
        other = await api.post("/api/v1/studies", json={"key": "rl-x", "name": "n", "timezone": "UTC"},
                               headers={"Authorization": "Bearer someone-else"})
        assert other.status_code == 401  # another token has its own budget
    assert re.match(r"\d+", limited.headers["retry-after"])
