from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, text

from tests.conftest import ADMIN_TOKEN
from tests.factories import auth, create_study, create_token, valid_answers

pytestmark = pytest.mark.anyio

BASE = "/api/v1/studies/pal"


class Team:
    def __init__(self, client: httpx.AsyncClient, coordinator: str, collector: str, analyst: str) -> None:
        self.client, self.coordinator, self.collector, self.analyst = client, coordinator, collector, analyst

    async def enrol(self, external_id: str, days_ago: float, **extra: Any) -> dict[str, Any]:
        enrolled = datetime.now(UTC) - timedelta(days=days_ago)
        r = await self.client.post(f"{BASE}/participants", headers=auth(self.coordinator),
                                   json={"external_id": external_id, "enrolled_at": enrolled.isoformat(), **extra})
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body

    async def post(self, body: dict[str, Any], token: str | None = None, **headers: str) -> httpx.Response:
        return await self.client.post(f"{BASE}/responses", json=body,
                                      headers={**auth(token or self.collector), **headers})


@pytest.fixture
async def team(admin: httpx.AsyncClient, app_client: httpx.AsyncClient) -> Team:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    tokens = [await create_token(admin, ADMIN_TOKEN, role) for role in ("coordinator", "collector", "analyst")]
    return Team(app_client, *tokens)


def response(external_id: str, wave: str, answers: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"external_id": external_id, "wave": wave, "answers": answers, **extra}


async def test_three_waves_stored_exactly_as_sent(team: Team) -> None:
    await team.enrol("P1", days_ago=400)
    rng = random.Random(1)
    sent = {}
    enrolled = datetime.now(UTC) - timedelta(days=400)
    for wave, day in (("baseline", 2), ("month6", 180), ("month12", 360)):
        answers = valid_answers(wave, rng, primary_group="smart")
        answers["meetings_30d"] = 7 if wave != "month12" else 0
        answers["online_meetings_30d"] = 3 if wave != "month12" else 0
        sent[wave] = answers
        r = await team.post(response("P1", wave, answers, completed_at=(enrolled + timedelta(days=day)).isoformat()))
        assert r.status_code == 201, r.text
        body = r.json()
        assert body.keys() >= {"id", "external_id", "wave", "status", "received_at", "derived"}
        assert body["external_id"] == "P1" and body["status"] == "complete" and body["late"] is False
        assert body["derived"]["online_30d"] is (wave != "month12")
    listed = (await team.client.get(f"{BASE}/responses", params={"external_id": "P1"},
                                    headers=auth(team.coordinator))).json()["items"]
    assert {r["wave"]: r["answers"] for r in listed} == sent
    one = (await team.client.get(f"{BASE}/responses/{listed[0]['id']}", headers=auth(team.coordinator))).json()
    assert one["answers"] == sent[one["wave"]]
    # aud_severity is asked at baseline only: follow-ups carry the participant's baseline value
    severity = {r["wave"]: r["derived"]["aud_severity"] for r in listed}
    assert severity["month6"] == severity["month12"] == severity["baseline"] == sum(
        1 for i in range(1, 12) if sent["baseline"][f"aud_{i}"])
    participant = (await team.client.get(f"{BASE}/participants/P1", headers=auth(team.coordinator))).json()
    assert participant["status"] == "completed"
    assert {s["wave"]: s["status"] for s in participant["schedule"]} == dict.fromkeys(sent, "completed")


async def test_bad_answers_come_back_per_item(team: Team) -> None:
    await team.enrol("P2", days_ago=1)
    answers = valid_answers("baseline", random.Random(2), primary_group="none")
    answers.update(age="34", hispanic=1, race="martian", favourite="x", home_group=True)
    answers.pop("gender")
    r = await team.post(response("P2", "baseline", answers))
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    found = {tuple(e["loc"]): e["code"] for e in r.json()["errors"]}
    assert found == {("answers", "age"): "type", ("answers", "hispanic"): "type", ("answers", "race"): "option",
                     ("answers", "favourite"): "unknown_item", ("answers", "home_group"): "not_enabled",
                     ("answers", "gender"): "required"}
    listed = (await team.client.get(f"{BASE}/responses", headers=auth(team.coordinator))).json()["items"]
    assert listed == []


async def test_unknown_wave_participant_and_wrong_study(team: Team, admin: httpx.AsyncClient) -> None:
    await team.enrol("P3", days_ago=1)
    answers = valid_answers("baseline", random.Random(3))
    r = await team.post(response("P3", "month9", answers))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["wave"]
    r = await team.post(response("NOBODY", "baseline", answers))
    assert r.status_code == 404
    await create_study(admin, ADMIN_TOKEN, key="other")
    r = await team.client.post("/api/v1/studies/other/responses", json=response("P3", "baseline", answers),
                               headers=auth(team.collector))
    assert r.status_code == 404  # P3 belongs to pal, not to other
    r = await team.client.post("/api/v1/studies/nosuch/responses", json=response("P3", "baseline", answers),
                               headers=auth(team.collector))
    assert r.status_code == 404


async def test_partial_then_complete_then_409(team: Team) -> None:
    await team.enrol("P4", days_ago=2)
    answers = valid_answers("baseline", random.Random(4), primary_group="aa_12step")
    first = dict(list(answers.items())[:10])
    rest = dict(list(answers.items())[10:])
    r = await team.post(response("P4", "baseline", first, status="partial"))
    assert r.status_code == 201 and r.json()["status"] == "partial"
    rid = r.json()["id"]
    r = await team.post(response("P4", "baseline", rest, status="complete"))
    assert r.status_code == 200 and r.json()["id"] == rid and r.json()["status"] == "complete"
    stored = (await team.client.get(f"{BASE}/responses/{rid}", headers=auth(team.coordinator))).json()
    assert stored["answers"] == answers
    r = await team.post(response("P4", "baseline", {"age": 50}))
    assert r.status_code == 409
    stored = await team.client.get(f"{BASE}/responses/{rid}", headers=auth(team.coordinator))
    assert stored.json()["answers"] == answers


async def test_partial_accepts_a_dependent_item_before_its_controller(team: Team) -> None:
    await team.enrol("P5", days_ago=2)
    r = await team.post(response("P5", "baseline", {"home_group": True}, status="partial"))
    assert r.status_code == 201, r.text
    answers = valid_answers("baseline", random.Random(5), primary_group="none")
    answers.pop("home_group", None)
    r = await team.post(response("P5", "baseline", answers, status="complete"))
    assert r.status_code == 422
    assert {tuple(e["loc"]): e["code"] for e in r.json()["errors"]} == {("answers", "home_group"): "not_enabled"}


async def test_coordinator_corrects_with_a_reason(team: Team) -> None:
    await team.enrol("P6", days_ago=400)
    base_answers = valid_answers("baseline", random.Random(6), **{f"aud_{i}": False for i in range(1, 12)})
    b = (await team.post(response("P6", "baseline", base_answers))).json()
    m6 = (await team.post(response("P6", "month6", valid_answers("month6", random.Random(7))))).json()
    assert m6["derived"]["aud_severity"] == 0
    r = await team.client.patch(f"{BASE}/responses/{b['id']}", json={"answers": {"aud_1": True, "age": 41},
                                                                       "reason": "typo on paper form"},
                                headers=auth(team.collector))
    assert r.status_code == 403
    r = await team.client.patch(f"{BASE}/responses/{b['id']}", json={"answers": {"aud_1": True, "age": 41},
                                                                       "reason": "typo on paper form"},
                                headers=auth(team.coordinator))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answers"]["aud_1"] is True and body["answers"]["age"] == 41
    assert body["corrections"][0]["before"] == {"aud_1": False, "age": base_answers["age"]}
    assert body["corrections"][0]["after"] == {"aud_1": True, "age": 41}
    assert body["corrections"][0]["reason"] == "typo on paper form"
    assert body["derived"]["aud_severity"] == 1
    follow_up = (await team.client.get(f"{BASE}/responses/{m6['id']}", headers=auth(team.coordinator))).json()
    assert follow_up["derived"]["aud_severity"] == 1  # carried value follows the corrected baseline
    r = await team.client.patch(f"{BASE}/responses/{b['id']}", json={"answers": {"age": 12}, "reason": "x"},
                                headers=auth(team.coordinator))
    assert r.status_code == 422 and r.json()["errors"][0]["code"] == "range"
    r = await team.client.patch(f"{BASE}/responses/{b['id']}", json={"answers": {"gender": None}, "reason": "x"},
                                headers=auth(team.coordinator))
    assert r.status_code == 422 and r.json()["errors"][0]["code"] == "required"


async def test_late_responses_are_accepted_and_flagged(team: Team) -> None:
    await team.enrol("P7", days_ago=100)
    r = await team.post(response("P7", "baseline", valid_answers("baseline", random.Random(8))))
    assert r.status_code == 201 and r.json()["late"] is True
    r = await team.post(response("P7", "month6", valid_answers("month6", random.Random(8))))
    assert r.status_code == 201 and r.json()["late"] is True  # month6 window is not open yet


async def test_withdrawn_participant_and_future_completion(team: Team) -> None:
    await team.enrol("P8", days_ago=1)
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    r = await team.post(response("P8", "baseline", valid_answers("baseline", random.Random(9)), completed_at=future))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["completed_at"]
    await team.client.post(f"{BASE}/participants/P8/withdraw", json={"reason": "moved"},
                           headers=auth(team.coordinator))
    r = await team.post(response("P8", "baseline", valid_answers("baseline", random.Random(9))))
    assert r.status_code == 409


async def test_who_reads_responses(team: Team, connection: Connection) -> None:
    await team.enrol("P9", days_ago=1)
    rid = (await team.post(response("P9", "baseline", valid_answers("baseline", random.Random(10))))).json()["id"]
    assert (await team.client.get(f"{BASE}/responses/{rid}", headers=auth(team.collector))).status_code == 403
    seen = (await team.client.get(f"{BASE}/responses/{rid}", headers=auth(team.analyst))).json()
    assert seen["external_id"] is None and seen["pseudonym"] and "P9" not in str(seen)
    coordinator_view = (await team.client.get(f"{BASE}/responses/{rid}", headers=auth(team.coordinator))).json()
    assert coordinator_view["external_id"] == "P9" and coordinator_view["pseudonym"] == seen["pseudonym"]
    stored = connection.execute(text("SELECT answers FROM responses WHERE id = :id"), {"id": rid}).scalar_one()
    assert stored == coordinator_view["answers"]


async def test_the_recompute_task_claims_due_studies_and_clears_them(team: Team, admin: httpx.AsyncClient,
                                                                     database: Any, connection: Connection,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The Celery task's own sequence (claim, batches, finish) on the real database."""
    from app.responses import tasks
    from tests.factories import pal_codebook

    for i in range(3):
        await team.enrol(f"R{i}", days_ago=1)
        answers = valid_answers("baseline", random.Random(20 + i), meetings_30d=5, online_meetings_30d=0)
        assert (await team.post(response(f"R{i}", "baseline", answers))).status_code == 201
    document = pal_codebook()
    document["version"] = 3
    next(d for d in document["derived"] if d["code"] == "weekly_attendance")["definition"] = "meetings_30d >= 9"
    assert (await admin.put(f"{BASE}/codebook", json=document)).status_code == 200
    monkeypatch.setattr(tasks, "task_database", lambda: database)
    assert tasks.recompute_derived() == 3
    assert connection.execute(text("SELECT count(*) FROM derived_recomputes")).scalar_one() == 0
    flags = connection.execute(text("SELECT derived ->> 'weekly_attendance' FROM responses")).scalars().all()
    assert flags == ["false", "false", "false"]
    assert tasks.recompute_derived() == 0  # nothing due: nothing done


async def test_derived_values_are_recomputed_when_definitions_change(team: Team, connection: Connection) -> None:
    await team.enrol("P10", days_ago=1)
    answers = valid_answers("baseline", random.Random(11), meetings_30d=5, online_meetings_30d=0)
    rid = (await team.post(response("P10", "baseline", answers))).json()["id"]
    # a row computed under other definitions (an older codebook version) is not served as is
    connection.execute(text("UPDATE responses SET derived = '{}'::jsonb, derived_signature = 'old' WHERE id = :id"),
                       {"id": rid})
    got = (await team.client.get(f"{BASE}/responses/{rid}", headers=auth(team.coordinator))).json()
    assert got["derived"]["weekly_attendance"] is True and got["derived"]["online_30d"] is False


async def test_a_new_codebook_revision_recomputes_derived_values(team: Team, admin: httpx.AsyncClient,
                                                                 database: Any, connection: Connection) -> None:
    from app.core.db import transaction
    from app.responses.service import recompute_stale_derived
    from app.studies.service import system_context
    from tests.factories import pal_codebook

    await team.enrol("P11", days_ago=1)
    answers = valid_answers("baseline", random.Random(12), meetings_30d=5, online_meetings_30d=1)
    rid = (await team.post(response("P11", "baseline", answers))).json()["id"]
    document = pal_codebook()
    document["version"] = 2
    weekly = next(d for d in document["derived"] if d["code"] == "weekly_attendance")
    weekly["definition"] = "meetings_30d >= 8"
    r = await admin.put(f"{BASE}/codebook", json=document)
    assert r.status_code == 200, r.text
    assert r.json()["codebook"]["revision"] == 2 and r.json()["codebook"]["version"] == 2
    got = (await team.client.get(f"{BASE}/responses/{rid}", headers=auth(team.coordinator))).json()
    assert got["derived"]["weekly_attendance"] is False  # 5 meetings: weekly under v1, not under v2
    assert got["answers"] == answers  # raw answers are untouched
    # the revision left due work in its own transaction: the periodic task claims it from there
    due = connection.execute(text("SELECT count(*) FROM derived_recomputes d JOIN studies s ON s.id = d.study_id "
                                  "WHERE s.key = 'pal'")).scalar_one()
    assert due == 1
    with transaction(database) as session:
        assert recompute_stale_derived(session, system_context(session, "pal")) == 1
    stored = connection.execute(text("SELECT derived FROM responses WHERE id = :id"), {"id": rid}).scalar_one()
    assert stored["weekly_attendance"] is False
    assert (await admin.get(f"{BASE}/codebook")).json() == document

    moved = pal_codebook()
    moved["waves"][1]["window_close_days"] = 240
    r = await admin.put(f"{BASE}/codebook", json=moved)
    assert r.status_code == 409 and r.json()["errors"][0]["loc"] == ["waves", "month6"]
    broken = pal_codebook()
    broken["instruments"][0]["items"][0]["type"] = "colour"
    r = await admin.put(f"{BASE}/codebook", json=broken)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["instruments", 0, "items", 0, "type"]


# -- instruments complete one at a time (contract section 5, v1.1) -----------------------------


def _by_instrument(answers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from tests.factories import pal_codebook

    owner = {it["code"]: inst["key"] for inst in pal_codebook()["instruments"] for it in inst["items"]}
    out: dict[str, dict[str, Any]] = {}
    for code, value in answers.items():
        out.setdefault(owner[code], {})[code] = value
    return out


async def test_instruments_complete_one_at_a_time(team: Team) -> None:
    await team.enrol("I1", days_ago=2)
    answers = valid_answers("baseline", random.Random(11), primary_group="smart")
    parts = _by_instrument(answers)
    assert list(parts) == ["demographics", "substance_use", "aud_criteria", "self_efficacy", "mutual_help"]

    # required items of the instrument being completed only, one entry per item
    demo = dict(parts["demographics"])
    del demo["age"], demo["race"]
    r = await team.post(response("I1", "baseline", demo, status="partial", complete_instruments=["demographics"]))
    assert r.status_code == 422, r.text
    assert sorted((e["loc"], e["code"]) for e in r.json()["errors"]) == [
        (["answers", "age"], "required"), (["answers", "race"], "required")]

    r = await team.post(response("I1", "baseline", parts["demographics"], status="partial",
                                 complete_instruments=["demographics"]))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "partial" and body["completed_at"] is None
    assert body["instruments"] == {"demographics": "complete", "substance_use": "not_started",
                                   "aud_criteria": "not_started", "self_efficacy": "not_started",
                                   "mutual_help": "not_started"}
    # a partial save of another instrument without completing it
    half = dict(list(parts["self_efficacy"].items())[:3])
    r = await team.post(response("I1", "baseline", half, status="partial"))
    assert r.status_code == 200, r.text
    assert r.json()["instruments"]["self_efficacy"] == "partial"

    done_at = datetime.now(UTC) - timedelta(hours=1)
    for key in ("substance_use", "aud_criteria", "self_efficacy"):
        r = await team.post(response("I1", "baseline", parts[key], status="partial", complete_instruments=[key]))
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "partial"
    participant = (await team.client.get(f"{BASE}/participants/I1", headers=auth(team.coordinator))).json()
    assert participant["schedule"][0]["status"] == "open"

    r = await team.post(response("I1", "baseline", parts["mutual_help"], status="partial",
                                 complete_instruments=["mutual_help"], completed_at=done_at.isoformat()))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "complete" and set(body["instruments"].values()) == {"complete"}
    assert datetime.fromisoformat(body["completed_at"]) == done_at
    assert body["derived"]["aud_severity"] == sum(1 for i in range(1, 12) if answers[f"aud_{i}"])

    stored = (await team.client.get(f"{BASE}/responses/{body['id']}", headers=auth(team.coordinator))).json()
    assert stored["answers"] == answers and set(stored["instruments"].values()) == {"complete"}
    listed = (await team.client.get(f"{BASE}/responses", params={"external_id": "I1"},
                                    headers=auth(team.coordinator))).json()["items"]
    assert listed[0]["instruments"] == stored["instruments"]
    # all the effects of completion: schedule completed, reminders cancelled, no more plain posts
    participant = (await team.client.get(f"{BASE}/participants/I1", headers=auth(team.coordinator))).json()
    assert participant["schedule"][0]["status"] == "completed"
    reminders = (await team.client.get(f"{BASE}/participants/I1/reminders", headers=auth(team.coordinator))).json()
    assert all(s["status"] != "pending" for s in reminders["items"] if s["wave"] == "baseline")
    r = await team.post(response("I1", "baseline", {"income": None}, status="partial"))
    assert r.status_code == 409


async def test_completed_at_of_the_last_instrument(team: Team) -> None:
    await team.enrol("I2", days_ago=200)
    answers = valid_answers("month6", random.Random(12), primary_group="none")
    parts = _by_instrument(answers)
    assert list(parts) == ["substance_use", "self_efficacy", "mutual_help"]  # only what month6 asks
    for key, part in parts.items():
        r = await team.post(response("I2", "month6", part, status="partial", complete_instruments=[key]))
        assert r.status_code in (200, 201), r.text
    body = r.json()
    assert body["status"] == "complete"
    completed = datetime.fromisoformat(body["completed_at"])
    assert abs((completed - datetime.now(UTC)).total_seconds()) < 60


async def test_complete_instruments_checked(team: Team) -> None:
    await team.enrol("I3", days_ago=200)
    r = await team.post(response("I3", "month6", {}, status="partial",
                                 complete_instruments=["demographics", "nonsense"]))
    assert r.status_code == 422
    assert [(e["loc"], e["code"]) for e in r.json()["errors"]] == [
        (["complete_instruments", 0], "not_in_wave"), (["complete_instruments", 1], "unknown_instrument")]
    # completing the instrument whose controlling item is unanswered rejects the dependent item then
    r = await team.post(response("I3", "month6", {"home_group": True}, status="partial"))
    assert r.status_code == 201, r.text
    r = await team.post(response("I3", "month6", {}, status="partial", complete_instruments=["mutual_help"]))
    assert r.status_code == 422
    codes = {e["loc"][-1]: e["code"] for e in r.json()["errors"]}
    assert codes["home_group"] == "not_enabled" and codes["primary_group"] == "required"
    assert "alcohol_last_use" not in codes  # another instrument's items are not required yet


async def test_status_complete_still_completes_everything(team: Team) -> None:
    await team.enrol("I4", days_ago=2)
    answers = valid_answers("baseline", random.Random(13), primary_group="aa_12step")
    r = await team.post(response("I4", "baseline", answers))
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "complete" and set(r.json()["instruments"].values()) == {"complete"}
