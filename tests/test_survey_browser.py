"""The participant's survey in Debian's Chromium (Playwright): from the reminder email to the thank-you page.

Every survey page is checked with axe-core (vendored in tests/vendor, injected by Playwright) for
WCAG 2.1 A/AA violations. Screenshots go to tests/screenshots/.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import URL

from tests.conftest import ADMIN_TOKEN, LiveServer, make_settings, serve_app
from tests.factories import auth, pal_codebook, valid_answers
from tests.smtp import SmtpServer
from tests.test_dashboard import chromium
from tests.test_workers import midday_zone

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
AXE = Path(__file__).resolve().parent / "vendor" / "axe.min.js"
BASE = "/api/v1/studies/pal"
WCAG = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
CODEBOOK = pal_codebook()
ITEMS = {it["code"]: it for inst in CODEBOOK["instruments"] for it in inst["items"]}
OWNER = {it["code"]: inst["key"] for inst in CODEBOOK["instruments"] for it in inst["items"]}


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture
def server(fresh_db: URL, tmp_path: Path, smtp: SmtpServer) -> Iterator[LiveServer]:
    chromium()
    settings = make_settings(fresh_db, tmp_path, smtp_url=smtp.url, rate_limit_per_minute=0, redis_url=None)
    with serve_app(settings, fresh_db) as live:
        with httpx.Client(base_url=live.url, headers=auth(ADMIN_TOKEN)) as admin:
            r = admin.post("/api/v1/studies", json={"key": "pal", "name": "PAL replication", "timezone": "UTC",
                                                    "template": "pal-replication"})
            assert r.status_code == 201
            admin.patch(BASE, json={"contact": "Dr Rosa Diaz, pal-study@example.edu"})
        yield live


def invited(server: LiveServer, smtp: SmtpServer, external_id: str) -> str:
    """Enrol a participant, run the reminder scan, and return the link of the invitation they received."""
    now = datetime.now(UTC)
    email = f"{external_id.lower()}@example.org"
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        r = admin.post(f"{BASE}/participants", json={
            "external_id": external_id, "enrolled_at": (now - timedelta(hours=1)).isoformat(),
            "timezone": midday_zone(now), "contact": {"email": email, "name": "Sam"}})
        assert r.status_code == 201, r.text
        ran = admin.post(f"{BASE}/reminders:run", params={"now": now.isoformat()})
        assert ran.status_code == 200 and ran.json()["sent"] >= 1, ran.text
    message = smtp.capture.to(email)[-1]
    found = re.search(r"https?://\S+(/s/[A-Za-z0-9_\-]+)", message.body)
    assert found, message.body
    return server.url + found.group(1)  # the message names the configured public address


def by_page(answers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for code, value in answers.items():
        out.setdefault(OWNER[code], {})[code] = value
    return out


def in_form_order(answers: dict[str, Any]) -> dict[str, Any]:
    """Checkbox answers come back in the order of the options on the page."""
    out = dict(answers)
    for code, value in answers.items():
        if isinstance(value, list):
            order = [o["code"] for o in ITEMS[code]["options"]]
            out[code] = sorted(value, key=order.index)
    return out


def fill(page: Any, answers: dict[str, Any]) -> None:
    for code, value in answers.items():
        kind = ITEMS[code]["type"]
        if kind in ("single_choice", "boolean"):
            shown = "true" if value is True else "false" if value is False else value
            page.locator(f'input[name="{code}"][value="{shown}"]').check()
        elif kind == "multi_choice":
            for option in ITEMS[code]["options"]:
                box = page.locator(f'input[name="{code}"][value="{option["code"]}"]')
                box.set_checked(option["code"] in value)
        else:
            page.locator(f"#q-{code}-input").fill(str(value))


def check_accessibility(page: Any, checked: list[str]) -> None:
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(AXE.read_text(encoding="utf-8"))
    result = page.evaluate("async (tags) => await axe.run(document, {runOnly: {type: 'tag', values: tags}})", WCAG)
    problems = [(v["id"], v["help"], [n["target"] for n in v["nodes"]][:3]) for v in result["violations"]]
    assert problems == [], f"{page.url}: {problems}"
    checked.append(page.title())


def progress(page: Any) -> str:
    return str(page.locator("#progress").inner_text())


@pytest.mark.parametrize("viewport", [(1280, 900), (360, 740)], ids=["desktop", "phone"])
def test_from_the_invitation_to_thank_you(server: LiveServer, smtp: SmtpServer, viewport: tuple[int, int]) -> None:
    from playwright.sync_api import sync_playwright

    width, height = viewport
    tag = "phone" if width < 400 else "desktop"
    external_id = f"B{width}"
    url = invited(server, smtp, external_id)
    answers = valid_answers("baseline", random.Random(width), primary_group="smart")
    answers["age"] = 41
    pages = by_page(answers)
    checked: list[str] = []
    SCREENSHOTS.mkdir(exist_ok=True)

    def shot(page: Any, name: str) -> None:
        page.screenshot(path=str(SCREENSHOTS / f"survey-{tag}-{name}.png"), full_page=True)
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{name} scrolls sideways at {width} px"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            page = context.new_page()
            page.goto(url)
            assert "Page 1 of 5" in progress(page) and "Dr Rosa Diaz" in page.content()
            check_accessibility(page, checked)
            shot(page, "1-demographics")
            # a validation error, shown beside the item and in the summary, then corrected
            fill(page, {**pages["demographics"], "age": 15})
            page.get_by_role("button", name="Next").click()
            summary = page.locator("#error-summary")
            assert "age must be between 18 and 99" in summary.inner_text()
            assert "age must be between 18 and 99" in page.locator("#err-age").inner_text()
            assert page.locator("#q-age-input").input_value() == "15"
            assert page.locator(f'input[name="gender"][value="{answers["gender"]}"]').is_checked()
            check_accessibility(page, checked)
            shot(page, "1-demographics-error")
            summary.get_by_role("link").first.click()
            assert page.evaluate("document.activeElement.id") == "q-age-input"
            page.locator("#q-age-input").fill("41")
            page.get_by_role("button", name="Next").click()
            for number, key in ((2, "substance_use"), (3, "aud_criteria")):
                assert f"Page {number} of 5" in progress(page)
                check_accessibility(page, checked)
                shot(page, f"{number}-{key}")
                fill(page, pages[key])
                page.get_by_role("button", name="Next").click()
            assert "Page 4 of 5" in progress(page)
            context.close()  # stop half-way: the browser is closed

            context = browser.new_context(viewport={"width": width, "height": height})
            page = context.new_page()
            page.goto(url)
            assert "Page 4 of 5" in progress(page)  # resumes at the first unfinished page
            page.get_by_role("link", name="Back").click()
            assert "Page 3 of 5" in progress(page)
            for code, value in pages["aud_criteria"].items():  # saved answers are filled in
                assert page.locator(f'input[name="{code}"][value="{str(value).lower()}"]').is_checked()
            page.get_by_role("button", name="Next").click()
            assert "Page 4 of 5" in progress(page)
            check_accessibility(page, checked)
            shot(page, "4-self_efficacy")
            fill(page, pages["self_efficacy"])
            page.get_by_role("button", name="Next").click()
            assert "Page 5 of 5" in progress(page)
            check_accessibility(page, checked)
            assert page.locator("#item-home_group").is_hidden()
            fill(page, pages["mutual_help"])  # choosing a primary group shows its questions at once
            assert page.locator("#item-home_group").is_visible()
            check_accessibility(page, checked)
            shot(page, "5-mutual_help")
            page.get_by_role("button", name="Submit my answers").click()
            assert page.get_by_role("heading", name="Thank you").is_visible()
            check_accessibility(page, checked)
            shot(page, "6-thank-you")
            page.goto(url)
            assert "already been received" in page.content()
            check_accessibility(page, checked)
        finally:
            browser.close()

    assert len(checked) == 9  # every survey page the participant saw, the error page and the closed one
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        stored = admin.get(f"{BASE}/responses", params={"external_id": external_id}).json()["items"]
    assert len(stored) == 1 and stored[0]["status"] == "complete"
    assert stored[0]["answers"] == in_form_order(answers)
    assert stored[0]["instruments"] == dict.fromkeys(pages, "complete")


@pytest.mark.parametrize("scripts", [True, False], ids=["javascript-on", "javascript-off"])
def test_enable_when_in_the_browser(server: LiveServer, smtp: SmtpServer, scripts: bool) -> None:
    from playwright.sync_api import sync_playwright

    external_id = f"J{int(scripts)}"
    url = invited(server, smtp, external_id)
    answers = valid_answers("baseline", random.Random(7 + scripts), primary_group="wfs")
    pages = by_page(answers)
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        for key in list(pages)[:4]:
            r = admin.post(f"{BASE}/responses", json={"external_id": external_id, "wave": "baseline",
                                                      "status": "partial", "answers": pages[key],
                                                      "complete_instruments": [key]})
            assert r.status_code in (200, 201), r.text
    independent = {k: v for k, v in pages["mutual_help"].items() if "enable_when" not in ITEMS[k]}
    dependent = {k: v for k, v in pages["mutual_help"].items() if "enable_when" in ITEMS[k]}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            context = browser.new_context(java_script_enabled=scripts, viewport={"width": 360, "height": 740})
            page = context.new_page()
            page.goto(url)
            assert "Page 5 of 5" in progress(page)
            assert page.locator("#item-home_group").is_hidden()
            if scripts:
                page.locator('input[name="primary_group"][value="none"]').check()
                assert page.locator("#item-home_group").is_hidden()
                page.locator('input[name="primary_group"][value="wfs"]').check()
                assert page.locator("#item-home_group").is_visible()
                page.locator('input[name="primary_group"][value="none"]').check()
                assert page.locator("#item-cohesion_6").is_hidden()
                fill(page, independent)
                fill(page, dependent)
            else:
                fill(page, independent)
                assert page.locator("#item-home_group").is_hidden()  # nothing changes until the server answers
                page.get_by_role("button", name="Submit my answers").click()
                # the server shows the questions that now apply, keeping what was answered
                assert "More questions apply" in page.content()
                assert "Page 5 of 5" in progress(page)
                assert page.locator("#item-home_group").is_visible()
                assert page.locator('input[name="primary_group"][value="wfs"]').is_checked()
                page.screenshot(path=str(SCREENSHOTS / "survey-no-javascript-revealed.png"), full_page=True)
                fill(page, dependent)
            page.get_by_role("button", name="Submit my answers").click()
            assert page.get_by_role("heading", name="Thank you").is_visible()
        finally:
            browser.close()
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        stored = admin.get(f"{BASE}/responses", params={"external_id": external_id}).json()["items"]
    assert stored[0]["status"] == "complete" and stored[0]["answers"] == in_form_order(answers)


def test_closed_and_unknown_links_in_the_browser(server: LiveServer, smtp: SmtpServer) -> None:
    from playwright.sync_api import sync_playwright

    url = invited(server, smtp, "W9")
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        admin.post(f"{BASE}/participants/W9/withdraw", json={"reason": "asked"})
    checked: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_context(viewport={"width": 360, "height": 740}).new_page()
            closed = page.goto(url)
            assert closed is not None and closed.status == 410
            assert page.get_by_role("heading", name="This survey is closed").is_visible()
            check_accessibility(page, checked)
            page.screenshot(path=str(SCREENSHOTS / "survey-closed.png"), full_page=True)
            unknown = page.goto(url[:-4] + ("AAAA" if not url.endswith("AAAA") else "BBBB"))
            assert unknown is not None and unknown.status == 404
            assert "W9" not in page.content() and "w9@example.org" not in page.content()
            check_accessibility(page, checked)
        finally:
            browser.close()


def test_every_item_type_in_the_browser(server: LiveServer) -> None:
    from playwright.sync_api import sync_playwright

    from app.reminders.links import LinkTarget, make_token
    from tests.conftest import SECRET_KEY
    from tests.test_survey import every_type_codebook

    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        r = admin.post("/api/v1/studies", json={"key": "types", "name": "Every type", "timezone": "UTC",
                                                "codebook": every_type_codebook()})
        assert r.status_code == 201, r.text
        p = admin.post("/api/v1/studies/types/participants", json={
            "external_id": "T1", "enrolled_at": datetime.now(UTC).isoformat()}).json()
    closes = datetime.fromisoformat(p["schedule"][0]["closes_at"])
    url = f"{server.url}/s/{make_token(SECRET_KEY, LinkTarget('types', p['id'], 'intake', closes))}"
    checked: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_context(viewport={"width": 360, "height": 740}).new_page()
            page.goto(url)
            check_accessibility(page, checked)
            assert page.locator("#item-cigs_day").is_hidden() and page.locator("#item-heavy_note").is_hidden()
            page.get_by_label("Drinks last week").fill("20")  # a numeric condition (>= 14), shown as it is typed
            assert page.locator("#item-heavy_note").is_visible()
            page.get_by_role("group", name="Smokes").get_by_label("Yes").check()
            assert page.locator("#item-cigs_day").is_visible()
            page.get_by_label("Cigarettes a day").fill("2.5")
            page.get_by_label("Planned quit date").fill("2026-03-01")
            page.get_by_label("Walks").check()
            page.get_by_label("Anything else").fill("nothing")
            page.get_by_label("Heavy weeks").fill("holidays")
            check_accessibility(page, checked)
            page.screenshot(path=str(SCREENSHOTS / "survey-every-type.png"), full_page=True)
            page.get_by_role("button", name="Submit my answers").click()
            assert page.get_by_role("heading", name="Thank you").is_visible()
        finally:
            browser.close()
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        stored = admin.get("/api/v1/studies/types/responses").json()["items"][0]
    assert stored["answers"] == {"drinks_week": 20, "smoker": True, "cigs_day": 2.5, "quit_date": "2026-03-01",
                                 "helps": ["walks"], "notes": "nothing", "heavy_note": "holidays"}
