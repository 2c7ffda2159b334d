"""Follow-up reminders, replayed through a whole study year with `reminders:run` and a real SMTP server."""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import Engine

from app.core.db import Database
from app.main import create_app
from tests.conftest import ADMIN_TOKEN, client_for, make_settings
from tests.factories import create_study, valid_answers
from tests.smtp import SmtpServer

pytestmark = pytest.mark.anyio

NY = ZoneInfo("America/New_York")
NZ = ZoneInfo("Pacific/Auckland")
KINDS = ("invitation", "reminder_1", "reminder_2", "final")
WAVES = {"baseline": (0, 30), "month6": (168, 228), "month12": (351, 411)}  # open day, last day
BASE = "/api/v1/studies/pal"


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture
async def reminder_app(shared_engine: Engine, database: Database, tmp_path: Path,
                       smtp: SmtpServer) -> AsyncIterator[FastAPI]:
    settings = make_settings(shared_engine.url, tmp_path, smtp_url=smtp.url,
                             survey_url_template="https://survey.example/take/{token}")
    app = create_app(settings, database=database)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def api(reminder_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(reminder_app, ADMIN_TOKEN) as client:
        yield client


async def run(api: httpx.AsyncClient, at: datetime) -> dict[str, Any]:
    r = await api.post(f"{BASE}/reminders:run", params={"now": at.isoformat()})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def enrol(api: httpx.AsyncClient, ext: str, at: datetime, email: str, **extra: Any) -> None:
    r = await api.post(f"{BASE}/participants", json={"external_id": ext, "enrolled_at": at.isoformat(),
                                                     "contact": {"email": email, "name": f"{ext} Person"}, **extra})
    assert r.status_code == 201, r.text


async def sends(api: httpx.AsyncClient, ext: str) -> list[dict[str, Any]]:
    r = await api.get(f"{BASE}/participants/{ext}/reminders")
    assert r.status_code == 200
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def scan_times(first_day: date, days: int) -> list[datetime]:
    """Two scans a day: 15:00 UTC (morning in New York) and 23:00 UTC (midday in Auckland)."""
    out = []
    for d in range(days):
        day = first_day + timedelta(days=d)
        out += [datetime.combine(day, time(15), tzinfo=UTC), datetime.combine(day, time(23), tzinfo=UTC)]
    return out


def first_scan_after(due: datetime, scans: list[datetime], zone: ZoneInfo) -> datetime:
    return next(t for t in scans if t >= due and time(9) <= t.astimezone(zone).time() < time(20))


async def test_a_study_year_of_reminders(api: httpx.AsyncClient, smtp: SmtpServer) -> None:
    await create_study(api, ADMIN_TOKEN, key="pal", timezone="America/New_York")
    day0 = (datetime.now(UTC) - timedelta(days=440)).date()
    enrolled = datetime.combine(day0, time(16), tzinfo=UTC)  # 11:00 or 12:00 in New York
    people = {"A": "a@example.org", "B": "b@example.org", "C": "c@example.org", "D": "d@example.org",
              "E": "e@example.org"}
    for ext, email in people.items():
        extra = {"timezone": "Pacific/Auckland"} if ext == "D" else {}
        at = enrolled + timedelta(hours=7, minutes=30) if ext == "D" else enrolled
        await enrol(api, ext, at, email, **extra)
    smtp.capture.fail_first["e@example.org"] = 2  # E's first two deliveries are refused (451), then accepted

    scans = scan_times(day0, 420)
    totals: dict[str, int] = {"sent": 0, "skipped": 0, "failed": 0, "cancelled": 0}
    for at in scans:
        if at == datetime.combine(day0 + timedelta(days=3), time(15), tzinfo=UTC):
            answers = valid_answers("baseline", random.Random(3))
            r = await api.post(f"{BASE}/responses", json={"external_id": "B", "wave": "baseline", "answers": answers,
                                                          "completed_at": (at - timedelta(hours=2)).isoformat()})
            assert r.status_code == 201
        if at == datetime.combine(day0 + timedelta(days=10), time(15), tzinfo=UTC):
            r = await api.post(f"{BASE}/participants/C/withdraw",
                               json={"reason": "no longer interested", "withdrawn_at": at.isoformat()})
            assert r.status_code == 200
        result = await run(api, at)
        for k in totals:
            totals[k] += result[k]

    def expected_ny(kinds_by_wave: Mapping[str, tuple[str, ...]]) -> dict[tuple[str, str], datetime]:
        out = {}
        for wave, kinds in kinds_by_wave.items():
            open_day, last_day = WAVES[wave]
            days = {"invitation": open_day, "reminder_1": open_day + 7, "reminder_2": open_day + 14,
                    "final": last_day - 3}
            for kind in kinds:
                due = datetime.combine(day0 + timedelta(days=days[kind]), time(9), tzinfo=NY)
                if wave == "baseline" and kind == "invitation":
                    due = enrolled
                out[(wave, kind)] = first_scan_after(due, scans, NY)
        return out

    def sent_of(items: list[dict[str, Any]]) -> dict[tuple[str, str], datetime]:
        return {(i["wave"], i["kind"]): datetime.fromisoformat(i["sent_at"]) for i in items if i["status"] == "sent"}

    everything = dict.fromkeys(WAVES, KINDS)
    # A never answers: every message of every wave, each at the first scan in sending hours on its day
    assert sent_of(await sends(api, "A")) == expected_ny(everything)
    # B completed the baseline before its first reminder: the rest of that wave is cancelled
    b = await sends(api, "B")
    assert sent_of(b) == expected_ny({"baseline": ("invitation",), "month6": KINDS, "month12": KINDS})
    assert {i["kind"]: i["status"] for i in b if i["wave"] == "baseline"} == {
        "invitation": "sent", "reminder_1": "cancelled", "reminder_2": "cancelled", "final": "cancelled"}
    # C withdrew on day 10: the invitation and the day-7 reminder, then nothing, whatever the clock
    c = await sends(api, "C")
    assert sent_of(c) == expected_ny({"baseline": ("invitation", "reminder_1")})
    assert all(i["status"] in ("sent", "cancelled") for i in c)
    # D lives in Auckland: messages at 09:00 Auckland time or the first scan after it
    d_sent = sent_of(await sends(api, "D"))
    assert len(d_sent) == 12
    for when in d_sent.values():
        assert time(9) <= when.astimezone(NZ).time() < time(20)
    assert d_sent[("month6", "reminder_1")] == first_scan_after(
        datetime.combine((enrolled + timedelta(hours=7, minutes=30)).astimezone(NZ).date() + timedelta(days=175),
                         time(9), tzinfo=NZ), scans, NZ)
    # E: refused twice, delivered at the third attempt
    e = {(i["wave"], i["kind"]): i for i in await sends(api, "E")}
    assert e[("baseline", "invitation")]["status"] == "sent" and e[("baseline", "invitation")]["attempts"] == 3
    assert len([i for i in e.values() if i["status"] == "sent"]) == 12

    # The mail server saw exactly these, once each
    for ext, email in people.items():
        got = smtp.capture.to(email)
        expected = {"A": 12, "B": 9, "C": 2, "D": 12, "E": 12}[ext]
        assert len(got) == expected, (ext, [m.subject for m in got])
        assert len({m.message_id for m in got}) == expected
    assert totals["sent"] == 47 and totals["failed"] == 0

    # The message itself: first name, wave, close date and a link that resolves without contact data
    msg = next(m for m in smtp.capture.to("a@example.org") if "6-month" in m.subject and "Reminder" in m.subject)
    assert msg.body.startswith("Hello A,")
    last_day = day0 + timedelta(days=228)
    assert f"{last_day.day} {last_day:%B %Y}" in msg.body
    token = re.search(r"https://survey\.example/take/(\S+)", msg.body)
    assert token
    r = await api.get(f"/s/{token.group(1)}")
    assert r.status_code == 410  # the 6-month window has closed by now (the study ran a year ago)


async def test_overdue_messages_collapse_to_the_latest(api: httpx.AsyncClient, smtp: SmtpServer) -> None:
    await create_study(api, ADMIN_TOKEN, key="pal", timezone="America/New_York")
    day0 = (datetime.now(UTC) - timedelta(days=40)).date()
    await enrol(api, "LATE", datetime.combine(day0, time(14), tzinfo=NY), "late@example.org")
    # no scan for 16 days: the invitation and both reminders are due at once
    result = await run(api, datetime.combine(day0 + timedelta(days=16), time(12), tzinfo=NY))
    assert (result["sent"], result["skipped"]) == (1, 2)
    items = {i["kind"]: i for i in await sends(api, "LATE") if i["wave"] == "baseline"}
    assert items["reminder_2"]["status"] == "sent"
    assert items["invitation"]["status"] == items["reminder_1"]["status"] == "skipped"
    assert len(smtp.capture.to("late@example.org")) == 1
    # a scan at night defers, a scan after the window closes skips
    night = await run(api, datetime.combine(day0 + timedelta(days=27), time(22), tzinfo=NY))
    assert night["deferred"] == 1 and night["sent"] == 0
    closed = await run(api, datetime.combine(day0 + timedelta(days=35), time(12), tzinfo=NY))
    assert closed["skipped"] == 1
    assert {i["kind"]: i["status"] for i in await sends(api, "LATE") if i["wave"] == "baseline"}["final"] == "skipped"


async def test_policy_and_template_edits_apply_to_unsent_messages(api: httpx.AsyncClient, smtp: SmtpServer) -> None:
    await create_study(api, ADMIN_TOKEN, key="pal", timezone="America/New_York")
    day0 = (datetime.now(UTC) - timedelta(days=20)).date()
    await enrol(api, "P", datetime.combine(day0, time(10), tzinfo=NY), "p@example.org")
    assert (await run(api, datetime.combine(day0, time(12), tzinfo=NY)))["sent"] == 1
    r = await api.put(f"{BASE}/waves/baseline/reminder-policy",
                      json={"invite_on_open": True, "reminder_days_after_open": [3], "final_days_before_close": None})
    assert r.status_code == 200 and r.json()["reminder_policy"]["reminder_days_after_open"] == [3]
    r = await api.put(f"{BASE}/reminder-template", json={"subject": "{{ study_name }} / {{ kind }}",
                                                         "body": "Hi {{ first_name }}: {{ survey_link }}"})
    assert r.status_code == 200
    bad = await api.put(f"{BASE}/reminder-template", json={"subject": "{{ nope }}", "body": "x"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["subject"]
    planned = {(i["wave"], i["kind"]): i["status"] for i in await sends(api, "P")}
    assert planned[("baseline", "invitation")] == "sent"
    assert ("baseline", "reminder_1") in planned and ("baseline", "reminder_2") not in planned
    assert ("baseline", "final") not in planned
    await run(api, datetime.combine(day0 + timedelta(days=3), time(12), tzinfo=NY))
    mails = smtp.capture.to("p@example.org")
    assert [m.subject for m in mails] == ["PAL replication: your Baseline survey is open",
                                          "PAL replication / reminder_1"]
    assert mails[1].body.startswith("Hi P:")


async def test_the_funnel_shows_which_message_preceded_completion(api: httpx.AsyncClient) -> None:
    await create_study(api, ADMIN_TOKEN, key="pal", timezone="America/New_York")
    day0 = (datetime.now(UTC) - timedelta(days=30)).date()
    for ext in ("F1", "F2", "F3"):
        await enrol(api, ext, datetime.combine(day0, time(10), tzinfo=NY), f"{ext.lower()}@example.org")

    async def complete(ext: str, day: int) -> None:
        r = await api.post(f"{BASE}/responses", json={
            "external_id": ext, "wave": "baseline", "answers": valid_answers("baseline", random.Random(day)),
            "completed_at": datetime.combine(day0 + timedelta(days=day), time(18), tzinfo=NY).isoformat()})
        assert r.status_code == 201

    await run(api, datetime.combine(day0, time(12), tzinfo=NY))  # invitations
    await complete("F1", 2)
    await run(api, datetime.combine(day0 + timedelta(days=7), time(12), tzinfo=NY))  # first reminders
    await complete("F2", 8)
    r = await api.get(f"{BASE}/reminders/funnel")
    baseline = r.json()["waves"][0]
    assert baseline["completed"] == 2
    assert baseline["completed_after"] == {"none": 0, "invitation": 1, "reminder_1": 1}
    assert baseline["sent"] == {"invitation": 3, "reminder_1": 2}


async def test_survey_links_resolve_for_a_front_end(api: httpx.AsyncClient, smtp: SmtpServer) -> None:
    await create_study(api, ADMIN_TOKEN, key="pal", timezone="America/New_York")
    await enrol(api, "L1", datetime.now(UTC) - timedelta(hours=1), "l1@example.org")
    now = datetime.now(UTC)
    if not time(9) <= now.astimezone(NY).time() < time(20):
        now = datetime.combine(now.astimezone(NY).date() + timedelta(days=1), time(12), tzinfo=NY)
    assert (await run(api, now))["sent"] == 1
    token = re.search(r"/take/(\S+)", smtp.capture.to("l1@example.org")[0].body)
    assert token
    r = await api.get(f"/s/{token.group(1)}")
    assert r.status_code == 200, r.text
    assert r.json()["external_id"] == "L1" and r.json()["wave"] == "baseline" and r.json()["wave_label"] == "Baseline"
    assert "l1@example.org" not in r.text
    assert (await api.get(f"/s/{token.group(1)[:-2]}xx")).status_code == 404


async def test_the_audit_trail_records_each_sends_outcome_not_its_leases(api: httpx.AsyncClient,
                                                                        smtp: SmtpServer) -> None:
    await create_study(api, ADMIN_TOKEN, key="pal", timezone="America/New_York")
    day0 = (datetime.now(UTC) - timedelta(days=3)).date()
    await enrol(api, "AUD", datetime.combine(day0, time(14), tzinfo=NY), "aud@example.org")
    assert (await run(api, datetime.combine(day0, time(15), tzinfo=NY)))["sent"] == 1
    r = await api.get(f"{BASE}/audit", params={"table": "reminder_sends", "limit": 500})
    entries = r.json()["items"]
    invitation = next(i for i in await sends(api, "AUD") if i["kind"] == "invitation")
    assert invitation["status"] == "sent"
    history = [e for e in entries if (e["after"] or {}).get("kind") == "invitation"]
    statuses = [e["after"]["status"] for e in reversed(history)]
    assert statuses[0] == "pending" and statuses[-1] == "sent"  # planned, then what became of it
    assert "sending" not in statuses  # the lease taken on the way is bookkeeping, not history
    assert all(e["actor"] for e in history if e["action"] == "UPDATE")


async def test_one_claim_decides_every_outcome_in_its_order(api: httpx.AsyncClient, connection: Any,
                                                            database: Database) -> None:
    """A batch holding every case is decided in the rule's order and recorded with its reason:
    window closed, or a later message of the wave due -> skipped; outside sending hours ->
    deferred to the next morning there; otherwise leased to be sent. Withdrawn or completed never
    reach the claim: the database cancels their pending sends, even when the change is made
    behind the service's back."""
    from sqlalchemy import text

    from app.core.db import transaction
    from app.reminders import service
    from app.reminders.policy import in_sending_hours, into_sending_hours

    await create_study(api, ADMIN_TOKEN, key="pal", timezone="America/New_York")
    now = datetime.combine(datetime.now(UTC).date() - timedelta(days=1), time(16), tzinfo=UTC)  # 11:00 in NY
    local = now.astimezone(NY)
    for ext, days_ago, extra in (("SEND", 2, {}), ("GONE", 2, {}), ("DONE", 2, {}), ("SHUT", 40, {}),
                                 ("LATER", 10, {}), ("NIGHT", 2, {"timezone": "Asia/Tokyo"})):
        await enrol(api, ext, datetime.combine(local.date() - timedelta(days=days_ago), time(8), tzinfo=NY),
                    f"{ext.lower()}@example.org", **extra)
    with transaction(database) as session:
        while service.plan(session, now):
            pass
    # states the eager cancellations would have closed, made behind their back
    connection.execute(text("UPDATE participants SET status = 'withdrawn', withdrawn_at = now() "
                            "WHERE external_id = 'GONE'"))
    connection.execute(text("UPDATE schedules SET completed_at = now() - interval '1 day' FROM participants p "
                            "WHERE p.id = schedules.participant_id AND p.external_id = 'DONE' "
                            "AND schedules.wave = 'baseline'"))
    closed = dict(connection.execute(text(
        "SELECT p.external_id, r.status FROM reminder_sends r JOIN participants p ON p.id = r.participant_id "
        "WHERE p.external_id IN ('GONE', 'DONE') AND r.kind = 'invitation'")).all())
    assert closed == {"GONE": "cancelled", "DONE": "cancelled"}  # at once, before any claim
    with transaction(database) as session:
        claims, result, seen = service.claim(session, now, owner=uuid.uuid4())
    got = {(r.external_id, r.kind): (r.status, r.last_error, r.due_at) for r in connection.execute(text(
        "SELECT p.external_id, r.kind, r.status, r.last_error, r.due_at FROM reminder_sends r "
        "JOIN participants p ON p.id = r.participant_id WHERE r.due_at <= :now OR r.status <> 'pending'"),
        {"now": now})}
    assert got[("SEND", "invitation")][0] == "sending"
    assert got[("GONE", "invitation")][:2] == ("cancelled", "participant withdrew")
    assert got[("DONE", "invitation")][:2] == ("cancelled", "wave completed")
    assert got[("SHUT", "invitation")][:2] == ("skipped", "the window closed before it was sent")
    assert got[("LATER", "invitation")][:2] == ("skipped", "a later message of this wave was due")
    assert got[("LATER", "reminder_1")][0] == "sending"
    assert all(v[:2] == ("skipped", "the window closed before it was sent")
               for (ext, _), v in got.items() if ext == "SHUT") and sum(ext == "SHUT" for ext, _ in got) == 4
    night = connection.execute(text(
        "SELECT r.status, r.due_at FROM reminder_sends r JOIN participants p ON p.id = r.participant_id "
        "WHERE p.external_id = 'NIGHT' AND r.kind = 'invitation'")).one()
    tokyo = ZoneInfo("Asia/Tokyo")
    assert not in_sending_hours(now, tokyo)  # 01:00 there: deferred to the morning, as the policy says
    assert night.status == "pending" and night.due_at == into_sending_hours(now, tokyo)
    assert {(c.external_id, c.kind) for c in claims} == {("SEND", "invitation"), ("LATER", "reminder_1")}
    assert (result.cancelled, result.skipped, result.deferred) == (0, 5, 1)
    assert seen == len(claims) + result.cancelled + result.skipped + result.deferred
