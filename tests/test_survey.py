"""The participant's survey behind a link (issue 13), over plain HTTP: pages, saving, links that stop working."""

from __future__ import annotations

import base64
import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import httpx
import pytest

from app.reminders.links import LinkTarget, make_token
from tests.conftest import ADMIN_TOKEN, SECRET_KEY
from tests.factories import create_study, pal_codebook, valid_answers

pytestmark = pytest.mark.anyio

BASE = "/api/v1/studies/pal"
HTML = {"Accept": "text/html,application/xhtml+xml"}


async def enrol(api: httpx.AsyncClient, external_id: str, days_ago: float = 1) -> dict[str, Any]:
    r = await api.post(f"{BASE}/participants", json={
        "external_id": external_id, "enrolled_at": (datetime.now(UTC) - timedelta(days=days_ago)).isoformat(),
        "contact": {"email": f"{external_id.lower()}@example.org"}})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def link(participant: dict[str, Any], wave: str = "baseline", expires: datetime | None = None) -> str:
    closes = next(s["closes_at"] for s in participant["schedule"] if s["wave"] == wave)
    when = expires or datetime.fromisoformat(closes)
    return make_token(SECRET_KEY, LinkTarget("pal", participant["id"], wave, when))


def csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found
    return found.group(1)


def form_for(instrument: str, answers: dict[str, Any], html: str, script: bool = True) -> list[tuple[str, str]]:
    """The fields a browser would post for a page, with `answers` chosen; with its script running,
    the conditional items answered were shown (their markers enabled), without it only what the server showed."""
    fields = [("csrf", csrf(html)), ("page", instrument)]
    shown = set(re.findall(r'name="shown" value="(\w+)">', html))
    if script:
        shown |= {code for code in answers if f'name="shown" value="{code}"' in html}
    fields += [("shown", code) for code in sorted(shown)]
    for code, value in answers.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            fields.append((code, "true" if v is True else "false" if v is False else str(v)))
    return fields


async def post(client: httpx.AsyncClient, token: str, fields: list[tuple[str, str]]) -> httpx.Response:
    return await client.post(f"/s/{token}", content=urlencode(fields),
                             headers={**HTML, "Content-Type": "application/x-www-form-urlencoded"})


def pages_of(answers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    owner = {it["code"]: inst["key"] for inst in pal_codebook()["instruments"] for it in inst["items"]}
    out: dict[str, dict[str, Any]] = {}
    for code, value in answers.items():
        out.setdefault(owner[code], {})[code] = value
    return out


@pytest.fixture
async def api(admin: httpx.AsyncClient) -> httpx.AsyncClient:
    await create_study(admin, ADMIN_TOKEN, key="pal")
    r = await admin.patch(BASE, json={"contact": "Dr Rosa Diaz, pal-study@example.edu, +1 555 0100"})
    assert r.status_code == 200 and r.json()["contact"].startswith("Dr Rosa Diaz")
    return admin


async def test_a_whole_survey_page_by_page(api: httpx.AsyncClient, app_client: httpx.AsyncClient) -> None:
    p = await enrol(api, "SURVEYONE1")
    token = link(p)
    decoded = base64.urlsafe_b64decode(token[2:] + "=" * (-len(token[2:]) % 4))
    for secret in (p["id"], "SURVEYONE1", "pal", "baseline"):  # opaque: nothing readable, not even once decoded
        # (the external id is long enough that a random token never spells it by chance)
        assert secret not in token and secret.encode() not in decoded
    answers = valid_answers("baseline", random.Random(3), primary_group="smart")
    parts = pages_of(answers)
    first = await app_client.get(f"/s/{token}", headers=HTML)
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/html")
    for header, value in (("x-frame-options", "DENY"), ("x-content-type-options", "nosniff"),
                          ("referrer-policy", "no-referrer")):
        assert first.headers[header] == value
    csp = first.headers["content-security-policy"]
    assert "unsafe-inline" not in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "Page 1 of 5" in first.text and "Demographics" in first.text and "Dr Rosa Diaz" in first.text
    assert "SURVEYONE1" not in first.text and "surveyone1@example.org" not in first.text
    # JSON clients keep the link's target
    resolved = (await app_client.get(f"/s/{token}")).json()
    assert resolved["external_id"] == "SURVEYONE1" and resolved["wave"] == "baseline"

    html = first.text
    for number, (instrument, part) in enumerate(parts.items(), start=1):
        assert f"Page {number} of 5" in html
        r = await post(app_client, token, form_for(instrument, part, html))
        if number < 5:
            assert r.status_code == 303 and r.headers["location"] == f"/s/{token}?page={number + 1}"
            html = (await app_client.get(r.headers["location"], headers=HTML)).text
        else:
            assert r.status_code == 200 and "Thank you" in r.text
    stored = (await api.get(f"{BASE}/responses", params={"external_id": "SURVEYONE1"})).json()["items"][0]
    assert stored["answers"] == answers and stored["status"] == "complete"
    assert set(stored["instruments"].values()) == {"complete"}
    audit = (await api.get(f"{BASE}/audit", params={"table": "responses"})).json()["items"]
    assert audit and all(e["actor"].startswith("link:") for e in audit)
    # the link has done its work
    again = await app_client.get(f"/s/{token}", headers=HTML)
    assert again.status_code == 410 and "already been received" in again.text
    assert (await app_client.get(f"/s/{token}")).status_code == 410


async def test_errors_beside_the_item_other_answers_kept(api: httpx.AsyncClient,
                                                         app_client: httpx.AsyncClient) -> None:
    p = await enrol(api, "S2")
    token = link(p)
    demo = pages_of(valid_answers("baseline", random.Random(4)))["demographics"]
    html = (await app_client.get(f"/s/{token}", headers=HTML)).text
    bad = {**demo, "age": 15}
    del bad["race"]
    r = await post(app_client, token, form_for("demographics", bad, html))
    assert r.status_code == 422
    assert 'href="#q-age-input"' in r.text and 'href="#q-race-0"' in r.text
    assert re.search(r'id="err-age">.*age must be between 18 and 99', r.text)
    assert re.search(r'id="err-race">.*race is required at baseline', r.text)
    assert 'value="15"' in r.text  # what was typed is kept
    assert f'value="{demo["gender"]}" checked' in r.text
    listed = (await api.get(f"{BASE}/responses", params={"external_id": "S2"})).json()["items"]
    assert listed == []  # nothing stored
    fixed = await post(app_client, token, form_for("demographics", demo, r.text))
    assert fixed.status_code == 303
    # reopening resumes at the first unfinished page, Back shows saved answers
    reopened = await app_client.get(f"/s/{token}", headers=HTML)
    assert "Page 2 of 5" in reopened.text and f'href="/s/{token}?page=1"' in reopened.text
    back = await app_client.get(f"/s/{token}?page=1", headers=HTML)
    assert f'value="{demo["age"]}"' in back.text
    skipping = await app_client.get(f"/s/{token}?page=4", headers=HTML)
    assert "Page 2 of 5" in skipping.text  # not past the first unfinished page


async def test_enable_when_without_scripts(api: httpx.AsyncClient, app_client: httpx.AsyncClient) -> None:
    p = await enrol(api, "S3")
    token = link(p)
    answers = valid_answers("baseline", random.Random(5), primary_group="aa_12step")
    parts = pages_of(answers)
    html = (await app_client.get(f"/s/{token}", headers=HTML)).text
    for instrument in list(parts)[:4]:
        r = await post(app_client, token, form_for(instrument, parts[instrument], html, script=False))
        assert r.status_code == 303, r.text
        html = (await app_client.get(r.headers["location"], headers=HTML)).text
    assert re.search(r'id="item-home_group"[^>]*hidden', html)  # unknown yet: not shown
    independent = {k: v for k, v in parts["mutual_help"].items()
                   if k in ("meetings_30d", "online_meetings_30d", "online_ever", "groups_30d", "primary_group")}
    r = await post(app_client, token, form_for("mutual_help", independent, html, script=False))
    assert r.status_code == 303 and r.headers["location"].endswith("page=5&more=1")
    html = (await app_client.get(r.headers["location"], headers=HTML)).text
    assert "More questions apply" in html
    assert not re.search(r'id="item-home_group"[^>]*hidden', html)  # it holds now: shown
    r = await post(app_client, token, form_for("mutual_help", parts["mutual_help"], html, script=False))
    assert r.status_code == 200 and "Thank you" in r.text
    stored = (await api.get(f"{BASE}/responses", params={"external_id": "S3"})).json()["items"][0]
    assert stored["answers"] == answers

    # with primary group "none", the dependent items stay away and nothing of them is stored
    q = await enrol(api, "S4")
    token = link(q)
    answers = valid_answers("baseline", random.Random(6), primary_group="none")
    html = (await app_client.get(f"/s/{token}", headers=HTML)).text
    for instrument, part in pages_of(answers).items():
        r = await post(app_client, token, form_for(instrument, part, html, script=False))
        if r.status_code == 303:
            html = (await app_client.get(r.headers["location"], headers=HTML)).text
            if instrument == "self_efficacy":
                assert re.search(r'id="item-home_group"[^>]*hidden', html)
    assert r.status_code == 200
    stored = (await api.get(f"{BASE}/responses", params={"external_id": "S4"})).json()["items"][0]
    assert stored["answers"] == answers and "home_group" not in stored["answers"]


async def test_links_that_no_longer_work_store_nothing(api: httpx.AsyncClient, app_client: httpx.AsyncClient) -> None:
    expired = await enrol(api, "E1", days_ago=40)
    withdrawn = await enrol(api, "W1")
    done = await enrol(api, "C1")
    other = await enrol(api, "O1")
    await api.post(f"{BASE}/participants/W1/withdraw", json={"reason": "asked"})
    answers = valid_answers("baseline", random.Random(7))
    assert (await api.post(f"{BASE}/responses", json={"external_id": "C1", "wave": "baseline",
                                                      "answers": answers})).status_code == 201
    demo = pages_of(answers)["demographics"]

    async def both(token: str) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        page = await app_client.get(f"/s/{token}", headers=HTML)
        as_json = await app_client.get(f"/s/{token}")
        fields = [("csrf", "x"), ("page", "demographics")] + [(k, str(v)) for k, v in demo.items()]
        posted = await post(app_client, token, fields)
        return page, as_json, posted

    page, as_json, posted = await both(link(expired))
    assert page.status_code == as_json.status_code == posted.status_code == 410
    closes = datetime.fromisoformat(expired["schedule"][0]["closes_at"]) - timedelta(seconds=1)
    last_day = closes.astimezone(ZoneInfo("America/New_York"))  # the participant's (here the study's) zone
    assert f"This survey closed on {last_day.day} {last_day:%B} {last_day.year}" in page.text
    page, as_json, posted = await both(link(withdrawn))
    assert page.status_code == as_json.status_code == posted.status_code == 410
    assert "This survey is closed" in page.text
    page, as_json, posted = await both(link(done))
    assert page.status_code == as_json.status_code == posted.status_code == 410
    assert "already been received" in page.text
    good = link(other)
    for altered in (good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB"), "s1" + "A" * 60, "nonsense"):
        page, as_json, posted = await both(altered)
        assert page.status_code == as_json.status_code == posted.status_code == 404
        assert "not recognised" in page.text
    for r in (page, posted):
        for ext in ("E1", "W1", "C1", "O1"):
            assert ext not in r.text
    # another participant's link opens their survey, never this one's; a form from one link fails on another
    html = (await app_client.get(f"/s/{good}", headers=HTML)).text
    mine = link(await enrol(api, "M1"))
    forged = await post(app_client, mine, form_for("demographics", demo, html))
    assert forged.status_code == 403
    stored = (await api.get(f"{BASE}/responses")).json()["items"]
    assert [r["external_id"] for r in stored] == ["C1"]


async def test_a_replayed_page_stores_one_response(api: httpx.AsyncClient, app_client: httpx.AsyncClient) -> None:
    p = await enrol(api, "R1")
    token = link(p)
    answers = valid_answers("baseline", random.Random(8))
    parts = pages_of(answers)
    html = (await app_client.get(f"/s/{token}", headers=HTML)).text
    fields = form_for("demographics", parts["demographics"], html)
    for _ in range(3):
        r = await post(app_client, token, fields)
        assert r.status_code == 303
    listed = (await api.get(f"{BASE}/responses", params={"external_id": "R1"})).json()["items"]
    assert len(listed) == 1 and listed[0]["instruments"]["demographics"] == "complete"
    for instrument in list(parts)[1:]:
        html = (await app_client.get(f"/s/{token}", headers=HTML)).text
        last = form_for(instrument, parts[instrument], html)
        r = await post(app_client, token, last)
    assert r.status_code == 200
    replay = await post(app_client, token, last)
    assert replay.status_code == 410 and "already been received" in replay.text
    listed = (await api.get(f"{BASE}/responses", params={"external_id": "R1"})).json()["items"]
    assert len(listed) == 1 and listed[0]["answers"] == answers


async def test_the_study_language_and_translated_labels(admin: httpx.AsyncClient,
                                                        app_client: httpx.AsyncClient) -> None:
    codebook = pal_codebook()
    codebook["key"] = "pal-es"
    demo = codebook["instruments"][0]
    demo["labels"] = {"en": "Demographics", "es": "Datos demográficos"}
    demo["items"][1]["labels"] = {"es": "Edad en años"}
    r = await admin.post("/api/v1/studies", json={"key": "pal", "name": "PAL", "timezone": "UTC",
                                                  "codebook": codebook})
    assert r.status_code == 201, r.text
    instruments = (await admin.get(f"{BASE}/instruments")).json()["items"]
    assert instruments[0]["labels"]["es"] == "Datos demográficos"
    assert (await admin.patch(BASE, json={"language": "es"})).json()["language"] == "es"
    p = await enrol(admin, "ES1")
    page = await app_client.get(f"/s/{link(p)}", headers=HTML)
    assert '<html lang="es">' in page.text and "Datos demográficos" in page.text and "Edad en años" in page.text
    assert "Página 1 de 5" in page.text and "Siguiente" in page.text


async def test_the_worklist_shows_how_far_each_participant_got(api: httpx.AsyncClient,
                                                               app_client: httpx.AsyncClient) -> None:
    p = await enrol(api, "F1")
    await enrol(api, "F2")
    token = link(p)
    parts = pages_of(valid_answers("baseline", random.Random(9)))
    for instrument in list(parts)[:2]:
        html = (await app_client.get(f"/s/{token}", headers=HTML)).text
        assert (await post(app_client, token, form_for(instrument, parts[instrument], html))).status_code == 303
    signed = await app_client.post("/ui/login", data={"token": ADMIN_TOKEN})
    assert signed.status_code == 303
    page = (await app_client.get("/ui/studies/pal/followup", params={"wave": "baseline", "status": "open"})).text
    rows = dict(re.findall(r'<tr data-participant="(\w+)">.*?data-field="instruments" data-value="([\d/]+)"', page,
                           re.S))
    assert rows == {"F1": "2/5", "F2": "0/5"}


async def test_the_participants_language_wins(api: httpx.AsyncClient, app_client: httpx.AsyncClient) -> None:
    r = await api.post(f"{BASE}/participants", json={
        "external_id": "LANG1", "enrolled_at": datetime.now(UTC).isoformat(), "language": "es"})
    assert r.status_code == 201 and r.json()["language"] == "es"
    page = await app_client.get(f"/s/{link(r.json())}", headers=HTML)
    assert '<html lang="es">' in page.text and "Página 1 de 5" in page.text
    english = await app_client.get(f"/s/{link(await enrol(api, 'LANG2'))}", headers=HTML)
    assert '<html lang="en">' in english.text
    bad = await api.post(f"{BASE}/participants", json={
        "external_id": "LANG3", "enrolled_at": datetime.now(UTC).isoformat(), "language": "klingon"})
    assert bad.status_code == 422


def every_type_codebook() -> dict[str, Any]:
    from tests.factories import minimal_codebook

    document = minimal_codebook(key="types")
    document["instruments"][0]["items"] += [
        {"code": "notes", "type": "text", "label": "Anything else", "max_length": 500, "waves": ["intake"]},
        {"code": "quit_date", "type": "date", "label": "Planned quit date", "waves": ["intake"]},
        {"code": "helps", "type": "multi_choice", "label": "What helps", "waves": ["intake"],
         "options": [{"code": "walks", "label": "Walks"}, {"code": "friends", "label": "Friends"}]},
        {"code": "heavy_note", "type": "text", "label": "Heavy weeks", "waves": ["intake"], "max_length": 80,
         "enable_when": {"item": "drinks_week", "operator": ">=", "value": 14}},
    ]
    return document


async def test_every_item_type_as_a_form(admin: httpx.AsyncClient, app_client: httpx.AsyncClient) -> None:
    r = await admin.post("/api/v1/studies", json={"key": "pal", "name": "Types", "timezone": "UTC",
                                                  "codebook": every_type_codebook()})
    assert r.status_code == 201, r.text
    p = await enrol(admin, "T1")
    token = link(p, wave="intake")
    html = (await app_client.get(f"/s/{token}", headers=HTML)).text
    assert "Page 1 of 1" in html
    assert 'type="checkbox" name="helps"' in html and 'type="date"' in html and "<textarea" in html
    assert 'inputmode="decimal"' in html and 'inputmode="numeric"' in html
    fields = [("csrf", csrf(html)), ("page", "core"), ("drinks_week", "x3"), ("smoker", "true"),
              ("cigs_day", "2.5"), ("notes", "  spaced  "), ("quit_date", "2026-02-30"), ("helps", "walks"),
              ("helps", "friends")] + [("shown", c) for c in ("drinks_week", "smoker", "cigs_day", "mood", "notes",
                                                               "quit_date", "helps")]
    bad = await post(app_client, token, fields)
    assert bad.status_code == 422
    assert "drinks_week takes a whole number" in bad.text and "quit_date takes a date as YYYY-MM-DD" in bad.text
    assert 'value="x3"' in bad.text and "  spaced  </textarea>" in bad.text
    fields = [(k, {"drinks_week": "15", "quit_date": "2026-03-01"}.get(k, v)) for k, v in fields]
    more = await post(app_client, token, fields)  # heavy_note now applies and was not on the page
    assert more.status_code == 303 and more.headers["location"].endswith("more=1")
    html = (await app_client.get(more.headers["location"], headers=HTML)).text
    assert not re.search(r'id="item-heavy_note"[^>]*hidden', html)
    done = await post(app_client, token, [*fields, ("heavy_note", "holidays"), ("shown", "heavy_note")])
    assert done.status_code == 200 and "Thank you" in done.text
    stored = (await admin.get(f"{BASE}/responses")).json()["items"][0]
    assert stored["answers"] == {"drinks_week": 15, "smoker": True, "cigs_day": 2.5, "notes": "  spaced  ",
                                 "quit_date": "2026-03-01", "helps": ["walks", "friends"],
                                 "heavy_note": "holidays"}
    assert stored["derived"] == {"heavy": True} and stored["instruments"] == {"core": "complete"}
