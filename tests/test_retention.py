"""Retention and outcomes for a generated cohort, against an independent count made here."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN
from tests.factories import auth, create_study, create_token, valid_answers

pytestmark = pytest.mark.anyio

NY = ZoneInfo("America/New_York")
WINDOWS = {"baseline": (0, 30), "month6": (168, 228), "month12": (351, 411)}
BASE = "/api/v1/studies/pal"


@dataclass
class Person:
    ext: str
    enrolled_at: datetime
    completed: dict[str, datetime]
    primary_group: str | None
    online: bool | None
    abstinent: dict[str, bool]
    withdrawn_at: datetime | None = None

    def window(self, wave: str) -> tuple[datetime, datetime]:
        day0: date = self.enrolled_at.astimezone(NY).date()
        first, last = WINDOWS[wave]

        def midnight(d: date) -> datetime:
            return datetime.combine(d, time(0), tzinfo=NY)

        return midnight(day0 + timedelta(days=first)), midnight(day0 + timedelta(days=last + 1))

    def status(self, wave: str, at: datetime) -> str:
        opens, closes = self.window(wave)
        done = self.completed.get(wave)
        if done is not None and done <= at:
            return "completed"
        if self.withdrawn_at is not None and self.withdrawn_at <= at and self.withdrawn_at < closes:
            return "withdrawn"
        if at < opens:
            return "scheduled"
        return "open" if at < closes else "missed"


def expected_retention(people: list[Person], at: datetime) -> list[dict[str, Any]]:
    rows = []
    for wave in WINDOWS:
        eligible = completed = late = 0
        counts = {"open": 0, "missed": 0, "withdrawn": 0}
        for p in people:
            if p.enrolled_at > at:
                continue
            opens, closes = p.window(wave)
            done = p.completed.get(wave)
            done_by = done is not None and done <= at
            in_window = done_by and opens <= done < closes  # type: ignore[operator]
            is_eligible = (closes <= at or in_window) and (p.withdrawn_at is None or p.withdrawn_at >= opens)
            if is_eligible:
                eligible += 1
                completed += done_by
                late += done_by and not in_window
            status = p.status(wave, at)
            if status in counts:
                counts[status] += 1
        rows.append({"wave": wave, "eligible": eligible, "completed": completed,
                     "rate": completed / eligible if eligible else None, "late": late, **counts})
    return rows


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def make_cohort(rng: random.Random, n: int, start: datetime) -> list[Person]:
    people = []
    groups = ["aa_12step", "smart", "lifering", "wfs", "none"]
    for i in range(n):
        enrolled = start + timedelta(days=rng.randint(0, 60), hours=rng.randint(0, 23))
        p = Person(f"R{i:03d}", enrolled, {}, None, None, {})
        for wave in WINDOWS:
            opens, closes = p.window(wave)
            roll = rng.random()
            if roll < 0.6:
                p.completed[wave] = opens + (closes - opens) * rng.random()
            elif roll < 0.7:
                p.completed[wave] = closes + timedelta(days=rng.randint(0, 20), hours=3)  # late
        if "baseline" in p.completed or rng.random() < 0.3:
            p.withdrawn_at = None
        if rng.random() < 0.1:
            p.withdrawn_at = enrolled + timedelta(days=rng.randint(10, 300))
        if "baseline" in p.completed:
            p.primary_group = rng.choice(groups)
            p.online = rng.random() < 0.4
        for wave in p.completed:
            p.abstinent[wave] = rng.random() < 0.6
        people.append(p)
    return people


def answers_for(p: Person, wave: str, rng: random.Random) -> dict[str, Any]:
    fixed: dict[str, Any] = {
        "alcohol_last_use": "over_1y" if p.abstinent[wave] else "within_30d",
        "drug_last_use": "never",
    }
    if wave == "baseline":
        fixed.update(primary_group=p.primary_group, meetings_30d=6, online_meetings_30d=3 if p.online else 0)
    return valid_answers(wave, rng, **fixed)


async def test_retention_and_outcomes_equal_an_independent_count(admin: httpx.AsyncClient) -> None:
    rng = random.Random(2026)
    await create_study(admin, ADMIN_TOKEN, key="pal", timezone="America/New_York")
    coordinator = await create_token(admin, ADMIN_TOKEN, "coordinator")
    analyst = await create_token(admin, ADMIN_TOKEN, "analyst")
    start = datetime.now(UTC) - timedelta(days=500)
    people = make_cohort(rng, 60, start)
    r = await admin.post(f"{BASE}/participants:import", headers=auth(coordinator), json=[
        {"external_id": p.ext, "enrolled_at": p.enrolled_at.isoformat()} for p in people])
    assert r.json() == {"created": 60, "errors": []}
    for p in people:
        for wave, done in sorted(p.completed.items(), key=lambda kv: kv[1]):
            r = await admin.post(f"{BASE}/responses", headers=auth(coordinator), json={
                "external_id": p.ext, "wave": wave, "completed_at": done.isoformat(),
                "answers": answers_for(p, wave, rng)})
            assert r.status_code == 201, r.text
        if p.withdrawn_at is not None:
            r = await admin.post(f"{BASE}/participants/{p.ext}/withdraw", headers=auth(coordinator),
                                 json={"reason": "test", "withdrawn_at": p.withdrawn_at.isoformat()})
            assert r.status_code == 200

    checkpoints = [start + timedelta(days=d) for d in (20, 100, 200, 250, 400, 480)] + [datetime.now(UTC)]
    for at in checkpoints:
        r = await admin.get(f"{BASE}/retention", params={"as_of": at.isoformat()}, headers=auth(analyst))
        assert r.status_code == 200
        assert r.json()["waves"] == expected_retention(people, at), at
    assert any(w["late"] for w in r.json()["waves"]) and any(w["withdrawn"] for w in r.json()["waves"])

    at = checkpoints[-1]
    r = await admin.get(f"{BASE}/retention", params={"as_of": at.isoformat(), "by": "primary_group"},
                        headers=auth(coordinator))
    body = r.json()
    assert body["by"] == "primary_group"
    groups = {g["group"]: g["waves"] for g in body["groups"]}
    for name, rows in groups.items():
        members = [p for p in people if (p.primary_group or "unknown") == name]
        assert rows == expected_retention(members, at), name
    assert sum(len([p for p in people if (p.primary_group or "unknown") == g]) for g in groups) == 60

    r = await admin.get(f"{BASE}/outcomes", params={"by": "online_30d"}, headers=auth(analyst))
    assert r.status_code == 200
    got = {(row["wave"], row["group"]): row for row in r.json()["items"]}
    for wave in WINDOWS:
        for online in (True, False):
            members = [p for p in people if p.online is online and wave in p.completed]
            n = len(members)
            k = sum(p.abstinent[wave] for p in members)
            row = got[(wave, "true" if online else "false")]
            assert (row["n"], row["abstinent"]) == (n, k)
            low, high = wilson(k, n)
            assert row["ci_low"] == pytest.approx(low, abs=1e-9) and row["ci_high"] == pytest.approx(high, abs=1e-9)


async def test_followup_worklist_orders_by_window_close(admin: httpx.AsyncClient) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal", timezone="America/New_York")
    now = datetime.now(UTC)
    for i, days_ago in enumerate((200, 175, 190, 10)):
        r = await admin.post(f"{BASE}/participants", json={
            "external_id": f"W{i}", "enrolled_at": (now - timedelta(days=days_ago)).isoformat(),
            "contact": {"email": f"w{i}@example.org"}})
        assert r.status_code == 201
    r = await admin.get(f"{BASE}/followup", params={"wave": "month6", "status": "open"})
    assert r.status_code == 200
    items = r.json()["items"]
    assert [i["external_id"] for i in items] == ["W0", "W2", "W1"]  # enrolled longest ago closes first
    assert all(i["wave_status"] == "open" and i["last_reminder_at"] is None for i in items)
    assert "w0@example.org" not in r.text
    page = (await admin.get(f"{BASE}/followup", params={"wave": "month6", "limit": 2})).json()
    rest = (await admin.get(f"{BASE}/followup", params={"wave": "month6", "cursor": page["next_cursor"]})).json()
    assert len(page["items"]) == 2 and len(rest["items"]) == 2 and rest["next_cursor"] is None


async def test_lost_after_both_follow_ups_are_missed_and_back_on_a_late_response(
    admin: httpx.AsyncClient, database: Any
) -> None:
    from app.core.db import transaction
    from app.participants.repository import advance_schedules

    await create_study(admin, ADMIN_TOKEN, key="pal", timezone="America/New_York")
    now = datetime.now(UTC)
    for ext in ("GONE", "STAYS"):
        await admin.post(f"{BASE}/participants", json={"external_id": ext,
                                                       "enrolled_at": (now - timedelta(days=420)).isoformat()})
    r = await admin.post(f"{BASE}/responses", json={"external_id": "STAYS", "wave": "month6",
                                                    "answers": valid_answers("month6", random.Random(1)),
                                                    "completed_at": (now - timedelta(days=230)).isoformat()})
    assert r.status_code == 201
    with transaction(database) as session:
        advance_schedules(session, now)
    statuses = {p["external_id"]: p["status"] for p in (await admin.get(f"{BASE}/participants")).json()["items"]}
    assert statuses == {"GONE": "lost", "STAYS": "active"}
    r = await admin.post(f"{BASE}/responses", json={"external_id": "GONE", "wave": "month6",
                                                    "answers": valid_answers("month6", random.Random(2))})
    assert r.status_code == 201 and r.json()["late"] is True
    assert (await admin.get(f"{BASE}/participants/GONE")).json()["status"] == "active"


async def test_the_retention_rollup_equals_the_exact_aggregate(admin: httpx.AsyncClient, connection: Any,
                                                               database: Any) -> None:
    """The triggers' rollup answers retention at or after the study's watermark; it must give the
    aggregate's numbers there, match a rebuild from scratch, and step aside before it."""
    from sqlalchemy import text

    from app.retention import service
    from app.studies.service import system_context

    rng = random.Random(77)
    await create_study(admin, ADMIN_TOKEN, key="pal", timezone="America/New_York")
    start = datetime.now(UTC) - timedelta(days=500)
    people = make_cohort(rng, 50, start)
    r = await admin.post(f"{BASE}/participants:import", json=[
        {"external_id": p.ext, "enrolled_at": p.enrolled_at.isoformat()} for p in people])
    assert r.json()["created"] == 50
    for p in people:
        for wave, done in sorted(p.completed.items(), key=lambda kv: kv[1]):
            body = {"external_id": p.ext, "wave": wave, "completed_at": done.isoformat(),
                    "answers": answers_for(p, wave, rng)}
            if rng.random() < 0.3:  # some arrive as partial first, then complete
                await admin.post(f"{BASE}/responses", json={**body, "status": "partial", "completed_at": None})
            assert (await admin.post(f"{BASE}/responses", json=body)).status_code in (200, 201)
        if p.withdrawn_at is not None:
            await admin.post(f"{BASE}/participants/{p.ext}/withdraw",
                             json={"reason": "test", "withdrawn_at": p.withdrawn_at.isoformat()})
    with database.sessions() as session:
        study = system_context(session, "pal").study.id
        waves = list(WINDOWS)
        now = datetime.now(UTC)
        for at in (now, now + timedelta(days=30), now + timedelta(days=400)):
            fast = service.retention(session, study, waves, at)[None]
            exact = service.retention(session, study, waves, at, rollup=False)[None]
            assert fast == exact, at
            assert exact == expected_retention(people, at)
        # the rollup is really what answered: emptied, the answer changes
        rollup = text("SELECT * FROM retention_counts WHERE n <> 0 ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9")
        kept = connection.execute(rollup).all()
        assert sum(row.n for row in kept) == 150  # every schedule counted once
        connection.execute(text("DELETE FROM retention_counts"))
        assert service.retention(session, study, waves, now)[None] != service.retention(
            session, study, waves, now, rollup=False)[None]
        # kept incrementally by the triggers == rebuilt from scratch
        connection.execute(text("SELECT cohort_retention_rebuild(:s)"), {"s": study})
        assert connection.execute(rollup).all() == kept
        # a completion reported a few minutes ahead moves the watermark past now: the aggregate answers
        ahead = next(p for p in people if p.withdrawn_at is None and "month12" not in p.completed)
        ahead.abstinent["month12"] = True
        r = await admin.post(f"{BASE}/responses", json={
            "external_id": ahead.ext, "wave": "month12", "completed_at": (now + timedelta(minutes=3)).isoformat(),
            "answers": answers_for(ahead, "month12", rng)})
        assert r.status_code == 201, r.text
        ahead.completed["month12"] = now + timedelta(minutes=3)
        at = datetime.now(UTC)
        assert service.retention(session, study, waves, at)[None] == expected_retention(people, at)
        later = at + timedelta(minutes=10)
        assert service.retention(session, study, waves, later)[None] == expected_retention(people, later)


async def test_the_group_rollup_equals_the_aggregate_through_every_kind_of_change(
        admin: httpx.AsyncClient, connection: Any, database: Any) -> None:
    """Retention by baseline primary group, read from the rollups, equals the plain aggregate after
    enrolments, partial and complete responses, corrections that change the group (one at a time and
    many in one statement), withdrawals (keeping and deleting answers) and late enrolments; the
    no-group row (no baseline yet) included; and the rollup kept by the triggers equals a rebuild."""
    from sqlalchemy import text

    from app.retention import service
    from app.studies.service import system_context

    rng = random.Random(16)
    await create_study(admin, ADMIN_TOKEN, key="pal", timezone="America/New_York")
    start = datetime.now(UTC) - timedelta(days=500)
    people = make_cohort(rng, 40, start)
    r = await admin.post(f"{BASE}/participants:import", json=[
        {"external_id": p.ext, "enrolled_at": p.enrolled_at.isoformat()} for p in people])
    assert r.json()["created"] == 40
    baseline_ids: dict[str, str] = {}
    for p in people:
        for wave, done in sorted(p.completed.items(), key=lambda kv: kv[1]):
            body = {"external_id": p.ext, "wave": wave, "completed_at": done.isoformat(),
                    "answers": answers_for(p, wave, rng)}
            if rng.random() < 0.4:  # progress saved first: a partial baseline puts nobody in a group
                r = await admin.post(f"{BASE}/responses", json={**body, "status": "partial", "completed_at": None})
                assert r.status_code == 201, r.text
            r = await admin.post(f"{BASE}/responses", json=body)
            assert r.status_code in (200, 201), r.text
            if wave == "baseline":
                baseline_ids[p.ext] = r.json()["id"]
    real_groups = ["aa_12step", "smart", "lifering", "wfs"]
    corrected = [p for p in people if p.primary_group in real_groups][:6]
    for p in corrected:  # a coordinator's correction moves the participant to another group
        p.primary_group = rng.choice([g for g in real_groups if g != p.primary_group])
        r = await admin.patch(f"{BASE}/responses/{baseline_ids[p.ext]}",
                              json={"answers": {"primary_group": p.primary_group}, "reason": "paper form"})
        assert r.status_code == 200, r.text
    for p in people[:20]:
        if p.withdrawn_at is not None:
            r = await admin.post(f"{BASE}/participants/{p.ext}/withdraw",
                                 json={"reason": "test", "withdrawn_at": p.withdrawn_at.isoformat()})
            assert r.status_code == 200
    assert (await admin.patch(BASE, json={"withdrawal_policy": "delete_responses"})).status_code == 200
    for p in people[20:]:  # their answers go, and with the baseline their group
        if p.withdrawn_at is not None:
            r = await admin.post(f"{BASE}/participants/{p.ext}/withdraw",
                                 json={"reason": "test", "withdrawn_at": p.withdrawn_at.isoformat()})
            assert r.status_code == 200
    for i in range(3):  # enrolled lately: no baseline, no group
        r = await admin.post(f"{BASE}/participants", json={
            "external_id": f"NEW{i}", "enrolled_at": (datetime.now(UTC) - timedelta(days=i)).isoformat()})
        assert r.status_code == 201
    # many participants change group, or leave one, in single statements
    connection.execute(text("UPDATE responses SET answers = jsonb_set(answers, '{primary_group}', '\"wfs\"') "
                            "WHERE wave = 'baseline' AND answers ->> 'primary_group' = 'smart'"))
    connection.execute(text("UPDATE responses SET status = 'partial' WHERE wave = 'baseline' AND "
                            "answers ->> 'primary_group' = 'lifering'"))
    connection.execute(text("UPDATE participants SET withdrawn_at = now() - interval '20 days', status = 'withdrawn' "
                            "WHERE external_id IN ('R030', 'R031', 'R032', 'NEW0')"))

    with database.sessions() as session:
        study = system_context(session, "pal").study.id
        waves = list(WINDOWS)
        now = datetime.now(UTC)
        for at in (now, now + timedelta(days=30), now + timedelta(days=400)):
            fast = service.retention(session, study, waves, at, by="primary_group")
            exact = service.retention(session, study, waves, at, by="primary_group", rollup=False)
            assert fast == exact, at
            assert "unknown" in fast and len(fast) >= 4
            assert [sum(w["eligible"] for w in rows) for rows in fast.values()] != [0] * len(fast)
        # the rollup is really what answered: emptied, the answer changes
        counts = text("SELECT * FROM retention_group_counts WHERE n <> 0 ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10")
        kept = connection.execute(counts).all()
        connection.execute(text("DELETE FROM retention_group_counts"))
        assert service.retention(session, study, waves, now, by="primary_group") != exact
        # kept incrementally by the triggers == rebuilt from scratch
        connection.execute(text("SELECT cohort_retention_rebuild(:s)"), {"s": study})
        assert connection.execute(counts).all() == kept


async def test_the_group_rollup_follows_the_studys_first_wave(admin: httpx.AsyncClient, connection: Any,
                                                              database: Any) -> None:
    """Groups come from the baseline, the study's first wave: should the waves be reordered, the
    rollup is counted again for the new first wave, and the codebook's baseline is still answered."""
    from sqlalchemy import text

    from app.retention import service
    from app.studies.service import system_context

    rng = random.Random(3)
    await create_study(admin, ADMIN_TOKEN, key="pal", timezone="America/New_York")
    people = make_cohort(rng, 12, datetime.now(UTC) - timedelta(days=500))
    await admin.post(f"{BASE}/participants:import", json=[
        {"external_id": p.ext, "enrolled_at": p.enrolled_at.isoformat()} for p in people])
    for p in people:
        for wave, done in sorted(p.completed.items(), key=lambda kv: kv[1]):
            await admin.post(f"{BASE}/responses", json={"external_id": p.ext, "wave": wave,
                                                        "completed_at": done.isoformat(),
                                                        "answers": answers_for(p, wave, rng)})
    counts = text("SELECT * FROM retention_group_counts WHERE n <> 0 ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9, 10")
    before = connection.execute(counts).all()
    assert {row.wave for row in before} == set(WINDOWS)
    connection.execute(text("UPDATE waves SET position = 2 - position"))  # month12 first
    assert connection.execute(counts).all() != before
    with database.sessions() as session:
        study = system_context(session, "pal").study.id
        at = datetime.now(UTC)
        expected = service.retention(session, study, list(WINDOWS), at, by="primary_group", rollup=False)
        assert service.retention(session, study, list(WINDOWS), at, by="primary_group") == expected
        connection.execute(text("UPDATE waves SET position = 2 - position"))
        assert connection.execute(counts).all() == before
        assert service.retention(session, study, list(WINDOWS), at, by="primary_group") == expected
