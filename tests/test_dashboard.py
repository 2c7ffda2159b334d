"""The dashboard under /ui, as a browser and as plain HTTP: sign-in, CSRF, roles, and numbers equal to the API's."""

from __future__ import annotations

import csv
import html
import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy.engine import URL

from app.dashboard import charts
from tests.conftest import ADMIN_TOKEN, LiveServer, make_settings, serve_app
from tests.factories import auth, pal_codebook, simulated_pal_study, valid_answers
from tests.processes import kill_group, start_worker
from tests.smtp import SmtpServer
from tests.test_workers import broker_for, midday_zone, worker_env

if TYPE_CHECKING:
    from playwright.sync_api import FloatRect

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
EMAIL = re.compile(r"[\w.+-]+@example\.org")


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture
def server(fresh_db: URL, tmp_path: Path, smtp: SmtpServer) -> Iterator[LiveServer]:
    settings = make_settings(fresh_db, tmp_path, smtp_url=smtp.url, rate_limit_per_minute=0,
                             redis_url=None)
    with serve_app(settings, fresh_db) as live:
        yield live


def simulated_study(server: LiveServer, n: int = 300, seed: int = 5) -> None:
    simulated_pal_study(server.url, ADMIN_TOKEN, server.settings, n, seed, name="PAL replication")


def token(server: LiveServer, role: str) -> str:
    r = httpx.post(f"{server.url}/api/v1/tokens", json={"role": role, "label": f"dashboard {role}"},
                   headers=auth(ADMIN_TOKEN))
    assert r.status_code == 201
    return str(r.json()["token"])


def signed_in(server: LiveServer, secret: str) -> httpx.Client:
    client = httpx.Client(base_url=server.url, follow_redirects=False, timeout=60)
    r = client.post("/ui/login", data={"token": secret})
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    return client


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the page has no CSRF field"
    return found.group(1)


def table_cells(html: str, table_id: str) -> dict[str, dict[str, str]]:
    """{data-wave (and data-group): {data-field: text or data-value}} from one table of a page."""
    body = re.search(rf'<table id="{re.escape(table_id)}">(.*?)</table>', html, re.S)
    assert body, f"no table {table_id}"
    out: dict[str, dict[str, str]] = {}
    for row in re.finditer(r'<tr data-wave="([^"]+)"(?: data-group="([^"]+)")?>(.*?)</tr>', body.group(1), re.S):
        key = row.group(1) + (f"/{row.group(2)}" if row.group(2) else "")
        cells = {}
        for cell in re.finditer(r'<td data-field="(\w+)"(?: data-value="([^"]*)")?[^>]*>([^<]*)</td>', row.group(3)):
            cells[cell.group(1)] = cell.group(2) if cell.group(2) is not None else cell.group(3)
        out[key] = cells
    return out


def table_html(html: str, table_id: str) -> str:
    body = re.search(rf'<table id="{re.escape(table_id)}">(.*?)</table>', html, re.S)
    assert body, f"no table {table_id}"
    return body.group(1)


def as_of_instant(html: str) -> str:
    found = re.search(r'<time id="as-of-instant" datetime="([^"]+)"', html)
    assert found
    return found.group(1)


# -- plain HTTP ------------------------------------------------------------------------------------


def test_sign_in_keeps_a_signed_httponly_cookie_never_the_token(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, follow_redirects=False) as anonymous:
        assert anonymous.get("/ui/").headers["location"] == "/ui/login"
        refused = anonymous.post("/ui/login", data={"token": "coh_not-a-token"})
        assert refused.status_code == 401 and "unknown or has been revoked" in refused.text
        assert "set-cookie" not in refused.headers
    secret = token(server, "coordinator")
    client = signed_in(server, secret)
    cookie = client.cookies.jar
    raw = next(c for c in cookie if c.name == "cohort_session")
    header = httpx.post(f"{server.url}/ui/login", data={"token": secret}).headers["set-cookie"].lower()
    assert "httponly" in header and "samesite=strict" in header and "path=/ui" in header
    assert raw.value is not None and secret not in raw.value and secret[4:20] not in raw.value
    home = client.get("/ui/")
    assert home.status_code == 200 and "Signed in as coordinator" in home.text
    tampered = httpx.get(f"{server.url}/ui/", cookies={"cohort_session": raw.value[:-2] + "xx"},
                         follow_redirects=False)
    assert tampered.status_code == 303 and tampered.headers["location"] == "/ui/login"


def test_revoking_the_token_ends_its_dashboard_sessions(server: LiveServer) -> None:
    secret = token(server, "analyst")
    client = signed_in(server, secret)
    assert client.get("/ui/").status_code == 200
    token_id = httpx.get(f"{server.url}/api/v1/tokens", headers=auth(ADMIN_TOKEN)).json()["items"][-1]["id"]
    assert httpx.delete(f"{server.url}/api/v1/tokens/{token_id}", headers=auth(ADMIN_TOKEN)).status_code in (200, 204)
    assert client.get("/ui/").headers["location"] == "/ui/login"


def test_a_form_without_the_sessions_csrf_value_changes_nothing(server: LiveServer) -> None:
    simulated_study(server, n=40)
    client = signed_in(server, token(server, "coordinator"))
    ext, other = "SIM000001", "SIM000002"
    forged = client.post(f"/ui/studies/pal/followup/{ext}/withdraw", data={"reason": "forged", "csrf": "guess"})
    assert forged.status_code == 403 and "did not come from this dashboard" in forged.text
    missing = client.post(f"/ui/studies/pal/followup/{ext}/withdraw", data={"reason": "forged"})
    assert missing.status_code == 403
    participant = httpx.get(f"{server.url}/api/v1/studies/pal/participants/{ext}", headers=auth(ADMIN_TOKEN))
    assert participant.status_code == 200 and participant.json()["status"] != "withdrawn"
    # with the value from the page, the same form works, and it is audited under the coordinator's token
    page = client.get("/ui/studies/pal/followup?wave=month6&status=missed")
    done = client.post(f"/ui/studies/pal/followup/{ext}/withdraw",
                       data={"reason": "moved abroad", "csrf": csrf_of(page.text)})
    assert done.status_code == 303 and "withdrawn" in client.get(done.headers["location"]).text
    after = httpx.get(f"{server.url}/api/v1/studies/pal/participants/{ext}", headers=auth(ADMIN_TOKEN)).json()
    assert after["status"] == "withdrawn"
    # a bad form (no reason) is a page naming the field, not a 500, and changes nothing
    empty = client.post(f"/ui/studies/pal/followup/{other}/withdraw", data={"csrf": csrf_of(page.text)})
    assert empty.status_code == 422 and "reason" in empty.text
    assert httpx.get(f"{server.url}/api/v1/studies/pal/participants/{other}",
                     headers=auth(ADMIN_TOKEN)).json()["status"] != "withdrawn"


def test_overview_and_outcomes_show_the_apis_numbers(server: LiveServer) -> None:
    simulated_study(server)
    analyst = token(server, "analyst")
    client = signed_in(server, analyst)
    for day in (None, (datetime.now(UTC) - timedelta(days=200)).date().isoformat()):
        html = client.get("/ui/studies/pal", params={"as_of": day} if day else {}).text
        when = as_of_instant(html)
        api = httpx.get(f"{server.url}/api/v1/studies/pal/retention",
                        params={"as_of": when, "by": "primary_group"}, headers=auth(analyst)).json()
        shown = table_cells(html, "retention")
        assert shown.keys() == {w["wave"] for w in api["waves"]}
        for w in api["waves"]:
            cells = shown[w["wave"]]
            for field in ("eligible", "completed", "open", "missed", "withdrawn", "late"):
                assert int(cells[field]) == w[field], (day, w["wave"], field)
            assert (float(cells["rate"]) if cells["rate"] else None) == w["rate"]
        for group in api["groups"]:
            per_group = table_cells(html, f"retention-{group['group']}")
            assert {k: int(v["completed"]) for k, v in per_group.items()} == {
                w["wave"]: w["completed"] for w in group["waves"]}
    assert sum(int(v["completed"]) for v in table_cells(html, "retention").values()) > 0  # not an empty study
    html = client.get("/ui/studies/pal/outcomes").text
    api = httpx.get(f"{server.url}/api/v1/studies/pal/outcomes",
                    params={"as_of": as_of_instant(html), "by": "online_30d"}, headers=auth(analyst)).json()
    shown = table_cells(html, "outcomes")
    assert len(shown) == len(api["items"]) > 0
    for item in api["items"]:
        cells = shown[f"{item['wave']}/{item['group']}"]
        assert (int(cells["n"]), int(cells["abstinent"])) == (item["n"], item["abstinent"])
        assert float(cells["rate"]) == item["rate"]


def test_roles_without_contact_rights_see_no_contact_data_on_any_page(server: LiveServer) -> None:
    simulated_study(server, n=60)
    coordinator = signed_in(server, token(server, "coordinator"))
    worklist = coordinator.get("/ui/studies/pal/followup?wave=month6&status=completed").text
    assert EMAIL.search(worklist), "the coordinator's worklist shows contact details"
    for role in ("analyst", "collector"):
        client = signed_in(server, token(server, role))
        pages = ["/ui/", "/ui/studies/pal", "/ui/studies/pal/outcomes", "/ui/studies/pal/data",
                 "/ui/studies/pal/followup", "/ui/studies/pal/followup?wave=month6&status=completed",
                 "/ui/studies/pal/export?format=csv&layout=long", "/ui/studies/pal/dictionary"]
        for path in pages:
            r = client.get(path)
            assert r.status_code in (200, 403), (role, path, r.status_code)
            assert not EMAIL.search(r.text) and "Participant " not in r.text, (role, path)
        assert client.get("/ui/studies/pal/followup").status_code == 403  # the worklist is the coordinator's
    collector = signed_in(server, token(server, "collector"))
    assert collector.get("/ui/studies/pal").status_code == 403


def test_send_a_reminder_now_from_the_worklist_and_over_the_api(server: LiveServer, smtp: SmtpServer) -> None:
    now = datetime.now(UTC)
    zone = midday_zone(now)
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        admin.post("/api/v1/studies", json={"key": "pal", "name": "PAL", "timezone": "UTC",
                                            "template": "pal-replication"})
        for i, ext in enumerate(("N1", "N2")):
            r = admin.post("/api/v1/studies/pal/participants", json={
                "external_id": ext, "enrolled_at": (now - timedelta(days=3)).isoformat(), "timezone": zone,
                "contact": {"email": f"n{i + 1}@example.org", "name": f"Nora {i + 1}"}})
            assert r.status_code == 201
    coordinator = token(server, "coordinator")
    client = signed_in(server, coordinator)
    page = client.get("/ui/studies/pal/followup?wave=baseline&status=open")
    assert "Send reminder now" in page.text and "n1@example.org" in page.text
    sent = client.post("/ui/studies/pal/followup/N1/remind",
                       data={"wave": "baseline", "csrf": csrf_of(page.text),
                             "back": "/ui/studies/pal/followup?wave=baseline&status=open"})
    assert sent.status_code == 303
    assert "Reminder for N1 (baseline) queued" in client.get(sent.headers["location"]).text
    listed = httpx.get(f"{server.url}/api/v1/studies/pal/participants/N1/reminders", headers=auth(coordinator))
    assert [s["status"] for s in listed.json()["items"] if s["kind"].startswith("manual_")] == ["pending"]
    # the worker's scan delivers it (here the same scan, run on the real clock)
    scan = httpx.post(f"{server.url}/api/v1/studies/pal/reminders:run", headers=auth(coordinator))
    assert scan.status_code == 200 and scan.json()["sent"] >= 1
    assert [m.to for m in smtp.capture.messages if m.to == "n1@example.org"]
    listed = httpx.get(f"{server.url}/api/v1/studies/pal/participants/N1/reminders", headers=auth(coordinator))
    assert [s["status"] for s in listed.json()["items"] if s["kind"].startswith("manual_")] == ["sent"]
    # the API does the same, and refuses what the rules refuse
    r = httpx.post(f"{server.url}/api/v1/studies/pal/participants/N2/reminders", json={"wave": "baseline"},
                   headers=auth(coordinator))
    assert r.status_code == 201 and r.json()["status"] == "pending" and r.json()["kind"].startswith("manual_")
    closed = httpx.post(f"{server.url}/api/v1/studies/pal/participants/N2/reminders", json={"wave": "month6"},
                        headers=auth(coordinator))
    assert closed.status_code == 409 and "not open" in closed.json()["detail"]
    httpx.post(f"{server.url}/api/v1/studies/pal/participants/N2/withdraw", json={"reason": "asked"},
               headers=auth(coordinator))
    refused = httpx.post(f"{server.url}/api/v1/studies/pal/participants/N2/reminders", json={"wave": "baseline"},
                         headers=auth(coordinator))
    assert refused.status_code == 409 and refused.headers["content-type"].startswith("application/problem+json")
    # N2 withdrew before the scan came round: the message queued for them is cancelled, never sent
    assert httpx.post(f"{server.url}/api/v1/studies/pal/reminders:run", headers=auth(coordinator)).status_code == 200
    n2 = httpx.get(f"{server.url}/api/v1/studies/pal/participants/N2/reminders", headers=auth(coordinator))
    assert [s["status"] for s in n2.json()["items"] if s["kind"].startswith("manual_")] == ["cancelled"]
    # the first scan was the ordinary one: N2's overdue invitation went with it, while N1's overdue
    # invitation was superseded by the message queued for now (only the latest of a wave goes)
    assert sorted(m.to for m in smtp.capture.messages) == ["n1@example.org", "n2@example.org"]


def test_a_withdrawal_from_a_stale_page_is_a_clear_conflict(server: LiveServer) -> None:
    """Two coordinators, two tabs: the form carries the version it was rendered with (If-Match)."""
    import random

    from tests.factories import valid_answers

    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        admin.post("/api/v1/studies", json={"key": "pal", "name": "PAL", "timezone": "UTC",
                                            "template": "pal-replication"})
        admin.post("/api/v1/studies/pal/participants", json={
            "external_id": "T1", "enrolled_at": (datetime.now(UTC) - timedelta(days=2)).isoformat()})
    coordinator = token(server, "coordinator")
    tab = signed_in(server, coordinator)
    page = tab.get("/ui/studies/pal/followup?wave=baseline&status=open").text
    version = re.search(r'name="version" value="([^"]+)"', page)
    assert version is not None
    # meanwhile, in the other tab (or a survey front-end), T1's baseline is completed
    r = httpx.post(f"{server.url}/api/v1/studies/pal/responses", headers=auth(coordinator), json={
        "external_id": "T1", "wave": "baseline", "answers": valid_answers("baseline", random.Random(1))})
    assert r.status_code == 201
    stale = tab.post("/ui/studies/pal/followup/T1/withdraw", data={
        "csrf": csrf_of(page), "reason": "asked", "version": html.unescape(version.group(1))})
    assert stale.status_code == 412 and "changed since you read it" in stale.text
    participant = httpx.get(f"{server.url}/api/v1/studies/pal/participants/T1", headers=auth(coordinator))
    assert participant.json()["status"] != "withdrawn"
    # with the page read again, the withdrawal goes through
    fresh = tab.get("/ui/studies/pal/followup?wave=baseline&status=completed").text
    version = re.search(r'name="version" value="([^"]+)"', fresh)
    assert version is not None
    done = tab.post("/ui/studies/pal/followup/T1/withdraw", data={
        "csrf": csrf_of(fresh), "reason": "asked", "version": html.unescape(version.group(1))})
    assert done.status_code == 303
    participant = httpx.get(f"{server.url}/api/v1/studies/pal/participants/T1", headers=auth(coordinator))
    assert participant.json()["status"] == "withdrawn"


def test_the_enrolment_chart_has_every_month_and_participants_without_a_baseline_are_named(
        server: LiveServer) -> None:
    import random

    now = datetime.now(UTC)
    first = now - timedelta(days=125)  # four months or so before the others: empty months between
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        assert admin.post("/api/v1/studies", json={"key": "pal", "name": "PAL", "timezone": "UTC",
                                                   "template": "pal-replication"}).status_code == 201
        for ext, when in (("EARLY", first), ("B1", now - timedelta(days=2)), ("N1", now - timedelta(days=2))):
            r = admin.post("/api/v1/studies/pal/participants",
                           json={"external_id": ext, "enrolled_at": when.isoformat()})
            assert r.status_code == 201, r.text
        answers = valid_answers("baseline", random.Random(3))
        r = admin.post("/api/v1/studies/pal/responses", json={"external_id": "B1", "wave": "baseline",
                                                               "answers": answers})
        assert r.status_code == 201, r.text
    client = signed_in(server, token(server, "coordinator"))
    page = client.get("/ui/studies/pal").text

    # every calendar month from the first enrolment to the last, the empty ones as 0
    months = re.findall(r'<tr data-month="([\d-]+)"><th scope="row">[\d-]+</th><td>(\d+)</td></tr>',
                        table_html(page, "enrolment"))
    expected, day = [], first.date().replace(day=1)
    while day <= now.date():
        expected.append(f"{day:%Y-%m}")
        day = (day + timedelta(days=32)).replace(day=1)
    assert [m for m, _ in months] == expected and len(expected) >= 4
    counts = dict(months)
    assert counts[expected[0]] == "1" and counts[expected[-1]] == "2"
    assert all(counts[m] == "0" for m in expected[1:-1])
    assert "3 in all" in page

    # the two without a baseline: their own table, last, named, with no rates and the reason why
    group = answers["primary_group"]
    label = {o["code"]: o["label"] for i in pal_codebook()["instruments"] for item in i["items"]
             if item["code"] == "primary_group" for o in item["options"]}[group]
    captions = re.findall(r'<table id="retention-([^"]+)">\s*<caption>([^<]+)</caption>', page)
    assert captions[-2:] == [(group, f"{label} ({group})"), ("unknown", "no baseline yet")]  # the option's label
    assert ">unknown<" not in page
    no_baseline = table_cells(page, "retention-unknown")
    assert no_baseline["baseline"]["eligible"] == "1" and no_baseline["baseline"]["open"] == "1"  # EARLY, N1
    rates = re.findall(r'<td data-field="rate" data-value="" title="([^"]+)">(.)</td>',
                       table_html(page, "retention-unknown"))
    assert [shown for _, shown in rates] == ["—", "—", "—"]
    assert all("without a complete baseline response" in why for why, _ in rates)
    assert 'data-note="no-rates">— no rates for participants without a complete baseline response' in page
    # a wave no one is eligible for yet has no rate either, said the same way
    overall = table_cells(page, "retention")
    assert overall["month12"]["eligible"] == "0" and overall["month12"]["rate"] == ""
    assert re.search(r'<td data-field="rate" data-value="" title="no rate yet: no one is eligible[^"]*">—</td>',
                     table_html(page, "retention"))
    assert 'data-note="no-rate">— no rate yet: no one is eligible for this wave' in page


def test_the_refit_page_has_the_study_nav_and_the_fit_shows_who_is_in_the_model(server: LiveServer) -> None:
    from app.analysis import tasks
    from app.core.db import Database

    simulated_study(server, n=240, seed=5)
    analyst = token(server, "analyst")
    client = signed_in(server, analyst)
    outcomes = client.get("/ui/studies/pal/outcomes").text
    assert 'id="h-online_attendance-"' in outcomes
    requested = client.post("/ui/studies/pal/analyses", data={"model": "online_attendance", "csrf": csrf_of(outcomes)})
    assert requested.status_code == 303
    location = requested.headers["location"]
    waiting = client.get(location).text
    assert 'data-status="queued"' in waiting and 'http-equiv="refresh"' in waiting
    nav = re.search(r'<nav aria-label="Study pages">(.*?)</nav>', waiting, re.S)
    assert nav, "the progress page has the study's navigation"
    links = dict((text, href) for href, text in re.findall(r'<a href="([^"]+)"[^>]*>([^<]+)</a>', nav.group(1)))
    assert links == {"Overview": "/ui/studies/pal", "Outcomes": "/ui/studies/pal/outcomes",
                     "Data": "/ui/studies/pal/data"}
    assert '<a href="/ui/studies/pal/outcomes#h-online_attendance-">Back to the analyses</a>' in waiting
    assert "<h1>Online attendance at baseline (logistic regression)</h1>" in waiting  # as on the Outcomes page

    db = Database.from_settings(server.settings)
    try:
        assert tasks.run(db, server.settings, location.rsplit("/", 1)[-1]) == "succeeded"
    finally:
        db.dispose()
    job = httpx.get(f"{server.url}/api/v1/analyses/{location.rsplit('/', 1)[-1]}", headers=auth(analyst)).json()
    results = job["results"]
    assert results["excluded"], "this seed leaves some out (primary group other or none)"
    page = client.get(location).text
    assert "<h1>Online attendance at baseline (logistic regression)</h1>" in page
    sample = re.search(r'<table class="sample"[^>]*>(.*?)</table>', page, re.S)
    assert sample, "who is in the model"
    shown = sample.group(1)
    population = int(re.findall(r'data-field="population">(\d+)<', shown)[0])
    n = int(re.findall(r'data-field="n">(\d+)<', shown)[0])
    left_out = re.findall(r'<tr data-excluded="([^"]+)"><th scope="row">left out: [^<]+</th>'
                          r'<td data-field="excluded">(\d+)</td>', shown)
    assert n == results["n"] and population == results["population"]["participants"]
    assert [(reason, int(k)) for reason, k in left_out] == [(e["reason"], e["n"]) for e in results["excluded"]]
    assert population == n + sum(int(k) for _, k in left_out)


def test_a_refit_on_unchanged_data_says_so_and_table1_opens_its_report(server: LiveServer) -> None:
    from app.analysis import tasks
    from app.core.db import Database

    simulated_study(server, n=200, seed=6)
    analyst = token(server, "analyst")
    client = signed_in(server, analyst)
    outcomes = client.get("/ui/studies/pal/outcomes").text
    db = Database.from_settings(server.settings)
    try:
        for model in ("online_attendance", "table1"):
            made = client.post("/ui/studies/pal/analyses", data={"model": model, "csrf": csrf_of(outcomes)})
            assert made.status_code == 303 and "reused" not in made.headers["location"]
            assert tasks.run(db, server.settings, made.headers["location"].rsplit("/", 1)[-1]) == "succeeded"
    finally:
        db.dispose()
    again = client.post("/ui/studies/pal/analyses", data={"model": "online_attendance", "csrf": csrf_of(outcomes)})
    assert again.status_code == 303 and again.headers["location"].endswith("?reused=1")
    assert "have not changed since this fit" in client.get(again.headers["location"]).text

    table1 = client.get(made.headers["location"]).text  # the last one made: table1
    link = re.search(r'<a href="(/ui/analyses/[^"]+/report)">Open the full report</a>', table1)
    assert link, "table 1's page links to a report the signed-in browser can open"
    report = client.get(link.group(1))
    assert report.status_code == 200 and "<table" in report.text
    job = httpx.get(f"{server.url}/api/v1/analyses/{made.headers['location'].rsplit('/', 1)[-1]}",
                    headers=auth(analyst)).json()
    first = job["results"]["variables"][0]["variable"]
    assert first in report.text
    assert httpx.get(f"{server.url}{link.group(1)}").status_code in (303, 401)  # not without signing in

    refused = client.get("/ui/studies/pal", params={"as_of": "1800-01-01"})  # as the API bounds it
    assert refused.status_code == 422 and "between the years 1900 and 2199" in refused.text


def test_chart_text_is_readable_and_months_are_filled_in() -> None:
    assert charts.every_month([]) == []
    assert charts.every_month([("2025-11", 3), ("2026-02", 1)]) == [
        ("2025-11", 3), ("2025-12", 0), ("2026-01", 0), ("2026-02", 1)]
    many = charts.every_month([("2024-01", 5), ("2026-12", 2)])
    assert len(many) == 36 and many[12] == ("2025-01", 0)
    drawn = [charts.bars("enrolment", many),
             charts.bars("retention", [("baseline", 100.0), ("month6", 80.0)], fmt="{:.0f} %", maximum=100),
             charts.intervals("odds ratios", [charts.Interval("woman", "odds ratio", 1.4, 1.0, 2.1),
                                              charts.Interval("age", "odds ratio", 0.98, 0.96, 0.99)],
                              log_scale=True, reference=1.0, axis="odds ratio")]
    for svg in drawn:
        sizes = {int(size) for size in re.findall(r'font-size="(\d+)"', svg)}
        assert sizes and min(sizes) >= 14, sizes
    # 36 months: every n-th named (from the first) so that names never overlap
    names = re.findall(r'>(\d{4}-\d\d)</text>', drawn[0])
    assert names[0] == "2024-01" and 4 <= len(names) <= 12


# -- in a real browser -----------------------------------------------------------------------------


def chromium() -> str:
    path = os.environ.get("COHORT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium); .ci/run installs it")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright package is not installed (it is in the dev extras)")
    return path


def test_in_a_browser_sign_in_read_retention_refit_and_download(fresh_db: URL, tmp_path: Path) -> None:
    """The pages a user reads, at 1366 px and on a phone; the screenshots are saved in tests/screenshots/."""
    from playwright.sync_api import expect, sync_playwright

    executable = chromium()
    settings = make_settings(fresh_db, tmp_path, rate_limit_per_minute=0)
    broker = broker_for(fresh_db, 13)
    with serve_app(settings.model_copy(update={"redis_url": broker if broker.startswith("redis") else None}),
                   fresh_db) as server:
        simulated_study(server, n=400, seed=11)
        # two enrolled this week, long after the simulated cohort: months without enrolment between,
        # and a group without a baseline yet
        for ext in ("NEW1", "NEW2"):
            r = httpx.post(f"{server.url}/api/v1/studies/pal/participants", headers=auth(ADMIN_TOKEN), json={
                "external_id": ext, "enrolled_at": (datetime.now(UTC) - timedelta(days=2)).isoformat()})
            assert r.status_code == 201, r.text
        analyst = token(server, "analyst")
        worker: subprocess.Popen[bytes] | None = None
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
                context = browser.new_context(accept_downloads=True, viewport={"width": 1366, "height": 900})
                page = context.new_page()
                page.goto(f"{server.url}/ui/")
                assert page.url.endswith("/ui/login")
                page.get_by_label("API token").fill(analyst)
                page.get_by_role("button", name="Sign in").click()
                page.get_by_role("link", name="PAL replication").click()

                # retention as the API reports it
                when = page.locator("#as-of-instant").get_attribute("datetime")
                api = httpx.get(f"{server.url}/api/v1/studies/pal/retention", params={"as_of": when},
                                headers=auth(analyst)).json()
                for w in api["waves"]:
                    row = page.locator(f'#retention tr[data-wave="{w["wave"]}"]')
                    assert row.locator('[data-field="eligible"]').inner_text() == str(w["eligible"])
                    assert row.locator('[data-field="completed"]').inner_text() == str(w["completed"])
                # nothing overlaps the enrolment toggle at 1366 px (the retention table sat on it once)
                toggle = page.get_by_text("Enrolment per month").bounding_box()
                for table in page.locator("table").all():
                    box = table.bounding_box()
                    if toggle and box and box["height"]:
                        assert not overlaps(toggle, box), "a table overlaps the enrolment toggle"
                # every month between the cohort and this week, the empty ones as 0; the newcomers named
                page.get_by_text("Enrolment per month").click()
                months = page.locator("#enrolment tbody tr")
                assert months.count() > 12 and "0" in months.locator("td").all_inner_texts()
                no_baseline = page.locator("#retention-unknown")
                expect(no_baseline.locator("caption")).to_have_text("no baseline yet")
                assert no_baseline.locator('[data-field="rate"]').all_inner_texts() == ["—", "—", "—"]
                expect(page.locator('[data-note="no-rates"]')).to_contain_text("without a complete baseline")
                SCREENSHOTS.mkdir(exist_ok=True)
                page.screenshot(path=str(SCREENSHOTS / "overview.png"), full_page=True)

                # a refit requested while no worker runs yet: the progress page, with the study's pages
                page.get_by_role("link", name="Outcomes", exact=True).click()
                section = page.locator('section[data-model="abstinence"][data-variant=""]')
                assert "Not fitted yet" in section.inner_text()
                section.get_by_role("button", name="Refit on the data as it stands").click()
                status = page.locator("#job-status")
                assert status.get_attribute("data-status") == "queued"
                nav = page.get_by_role("navigation", name="Study pages")
                for name in ("Overview", "Outcomes", "Data"):  # (expect retries: the page reloads every 2 s)
                    expect(nav.get_by_role("link", name=name, exact=True)).to_be_visible()
                expect(page.get_by_role("link", name="Back to the analyses")).to_be_visible()
                page.screenshot(path=str(SCREENSHOTS / "analysis-progress.png"), full_page=True)

                worker = start_worker(worker_env(settings, broker), tmp_path / "worker.log", "--queues", "analysis",
                                      "--concurrency", "1")
                # (a selector, not a script: the page's CSP allows no eval, for tests either)
                page.locator('#job-status[data-status="succeeded"], #job-status[data-status="failed"]').wait_for(
                    timeout=120_000)
                assert status.get_attribute("data-status") == "succeeded", status.inner_text()
                analysis_id = page.url.rsplit("/", 1)[-1]
                job = httpx.get(f"{server.url}/api/v1/analyses/{analysis_id}", headers=auth(analyst)).json()
                for c in job["results"]["coefficients"]:
                    shown = page.locator(f'tr[data-term="{c["term"]}"] [data-field="odds_ratio"]')
                    assert shown.inner_text() == f"{c['odds_ratio']:.3f}"
                # the online odds ratio at each wave first, with the plan version and who was left out
                assert [c["term"] for c in job["results"]["contrasts"]] == [
                    "online at baseline", "online at month6", "online at month12"]
                for c in job["results"]["contrasts"]:
                    shown = page.locator(f'tr[data-contrast="{c["term"]}"] [data-field="odds_ratio"]')
                    assert shown.inner_text() == f"{c['odds_ratio']:.3f}"
                assert page.locator('[data-field="plan_version"]').first.inner_text() == "1"
                assert page.locator("svg[role=img]").count() >= 1  # the forest plot
                assert page.locator('table.sample [data-field="n"]').inner_text() == str(job["results"]["n"])
                page.screenshot(path=str(SCREENSHOTS / "analysis.png"), full_page=True)

                # the attendance model: n, and who was left out and why
                page.get_by_role("link", name="Back to the analyses").click()
                attendance = page.locator('section[data-model="online_attendance"]')
                attendance.get_by_role("button", name="Refit on the data as it stands").click()
                page.locator('#job-status[data-status="succeeded"], #job-status[data-status="failed"]').wait_for(
                    timeout=120_000)
                fitted = httpx.get(f"{server.url}/api/v1/analyses/{page.url.rsplit('/', 1)[-1]}",
                                   headers=auth(analyst)).json()["results"]
                sample = page.locator("table.sample")
                assert sample.locator('[data-field="n"]').inner_text() == str(fitted["n"])
                for e in fitted["excluded"]:
                    assert f"left out: {e['reason']}" in sample.inner_text()
                    assert sample.locator(f'tr[data-excluded="{e["reason"]}"] td').inner_text() == str(e["n"])
                page.screenshot(path=str(SCREENSHOTS / "analysis-attendance.png"), full_page=True)

                page.get_by_role("link", name="Back to the analyses").click()
                outcome_section = page.locator('section[data-model="abstinence"][data-variant=""]')
                assert job["data"]["snapshot_sha256"] in outcome_section.inner_text()
                assert "online at month6" in outcome_section.locator("table.contrasts").inner_text()
                page.screenshot(path=str(SCREENSHOTS / "outcomes.png"), full_page=True)

                # an export download
                page.get_by_role("link", name="Data", exact=True).click()
                with page.expect_download() as info:
                    page.get_by_role("link", name="CSV, long").click()
                saved = tmp_path / "export.csv"
                info.value.save_as(saved)
                rows = list(csv.DictReader(io.StringIO(saved.read_text())))
                assert len(rows) == job_rows(server, analyst)
                assert "alcohol_last_use" in rows[0] and not any(EMAIL.search(str(v)) for v in rows[0].values())

                # the overview on a phone: the page is as wide as the screen (tables and charts scroll
                # inside their own boxes), and the retention rate is in view
                phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
                small = phone.new_page()
                small.goto(f"{server.url}/ui/login")
                small.get_by_label("API token").fill(analyst)
                small.get_by_role("button", name="Sign in").click()
                small.goto(f"{server.url}/ui/studies/pal")
                main = small.locator("main").bounding_box()
                assert main is not None and main["width"] <= 390
                rate = small.locator('#retention tr[data-wave="baseline"] [data-field="rate"]').bounding_box()
                assert rate is not None and rate["x"] + rate["width"] <= 390
                small.screenshot(path=str(SCREENSHOTS / "overview-phone.png"), full_page=True)
                browser.close()
        finally:
            if worker is not None:
                kill_group(worker, 15)


def overlaps(a: FloatRect, b: FloatRect) -> bool:
    return (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
            and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"])


def job_rows(server: LiveServer, analyst: str) -> int:
    r = httpx.get(f"{server.url}/api/v1/studies/pal/export", params={"format": "csv", "layout": "long"},
                  headers=auth(analyst), timeout=60)
    return len(list(csv.DictReader(io.StringIO(r.text))))

