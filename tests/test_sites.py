"""Multi-site studies: sites, the participant's site, moving between sites, and site-scoped tokens."""

from __future__ import annotations

import io
import json
import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pandas as pd
import pytest

from tests.conftest import ADMIN_TOKEN
from tests.factories import auth, create_study, valid_answers

pytestmark = pytest.mark.anyio

ENROLLED = (datetime.now(UTC) - timedelta(days=2)).isoformat()


async def site_token(client: httpx.AsyncClient, role: str, study: str, site: str | None) -> str:
    body: dict[str, Any] = {"role": role, "label": f"{site or 'all'} {role}", "study_key": study}
    if site is not None:
        body["site_key"] = site
    r = await client.post("/api/v1/tokens", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["site_key"] == site
    return str(r.json()["token"])


async def two_site_study(admin: httpx.AsyncClient) -> dict[str, Any]:
    """Sites north and south, two participants each (NORTH-1, NORTH-2 / SOUTH-1, SOUTH-2) with a complete
    baseline."""
    study = (await create_study(admin, ADMIN_TOKEN, timezone="UTC"))["key"]
    for key, zone in (("north", "Europe/Oslo"), ("south", None)):
        r = await admin.post(f"/api/v1/studies/{study}/sites", json={"key": key, "name": key.title(),
                                                                     "timezone": zone})
        assert r.status_code == 201, r.text
    responses = {}
    for external_id, site in (("NORTH-1", "north"), ("NORTH-2", "north"), ("SOUTH-1", "south"),
                              ("SOUTH-2", "south")):
        r = await admin.post(f"/api/v1/studies/{study}/participants",
                             json={"external_id": external_id, "enrolled_at": ENROLLED, "site": site,
                                   "contact": {"email": f"{external_id.lower()}@example.org"}})
        assert r.status_code == 201, r.text
        assert r.json()["site"] == site
        r = await admin.post(f"/api/v1/studies/{study}/responses", json={
            "external_id": external_id, "wave": "baseline", "status": "complete",
            "answers": valid_answers("baseline", random.Random(external_id))})
        assert r.status_code == 201, r.text
        responses[external_id] = r.json()["id"]
    return {"key": study, "responses": responses}


async def test_sites_are_created_listed_and_unique(admin: httpx.AsyncClient) -> None:
    study = (await create_study(admin, ADMIN_TOKEN, timezone="UTC"))["key"]
    assert (await admin.get(f"/api/v1/studies/{study}/sites")).json() == {"items": []}
    r = await admin.post(f"/api/v1/studies/{study}/sites", json={"key": "north", "name": "North",
                                                                 "timezone": "Europe/Oslo"})
    assert r.status_code == 201 and r.json()["key"] == "north" and r.json()["timezone"] == "Europe/Oslo"
    assert (await admin.post(f"/api/v1/studies/{study}/sites", json={"key": "north", "name": "x"})).status_code == 409
    bad = await admin.post(f"/api/v1/studies/{study}/sites", json={"key": "south", "name": "x", "timezone": "Mars/X"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["timezone"]
    assert (await admin.post(f"/api/v1/studies/{study}/sites", json={"key": "Bad Key", "name": "x"})).status_code == 422
    assert [s["key"] for s in (await admin.get(f"/api/v1/studies/{study}/sites")).json()["items"]] == ["north"]


async def test_enrolment_and_import_take_a_site_and_its_time_zone(admin: httpx.AsyncClient) -> None:
    world = await two_site_study(admin)
    study = world["key"]
    north = (await admin.get(f"/api/v1/studies/{study}/participants/NORTH-1")).json()
    assert north["site"] == "north" and north["timezone"] == "Europe/Oslo"
    south = (await admin.get(f"/api/v1/studies/{study}/participants/SOUTH-1")).json()
    assert south["site"] == "south" and south["timezone"] == "UTC"
    r = await admin.post(f"/api/v1/studies/{study}/participants", json={"external_id": "X1", "enrolled_at": ENROLLED,
                                                                        "site": "west"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["site"]
    csv = f"external_id,enrolled_at,site\nI1,{ENROLLED},north\nI2,{ENROLLED},\nI3,{ENROLLED},west\n"
    r = await admin.post(f"/api/v1/studies/{study}/participants:import", content=csv,
                         headers={"content-type": "text/csv"})
    assert r.status_code == 200 and r.json()["created"] == 0
    assert [(e["row"], e["loc"], e["code"]) for e in r.json()["errors"]] == [(3, ["site"], "unknown_site")]
    r = await admin.post(f"/api/v1/studies/{study}/participants:import", params={"partial": "true"}, content=csv,
                         headers={"content-type": "text/csv"})
    assert r.json()["created"] == 2
    assert (await admin.get(f"/api/v1/studies/{study}/participants/I1")).json()["site"] == "north"
    assert (await admin.get(f"/api/v1/studies/{study}/participants/I2")).json()["site"] is None
    listed = (await admin.get(f"/api/v1/studies/{study}/participants", params={"site": "north"})).json()["items"]
    assert sorted(p["external_id"] for p in listed) == ["I1", "NORTH-1", "NORTH-2"]


async def test_a_study_without_sites_is_as_before(admin: httpx.AsyncClient) -> None:
    study = (await create_study(admin, ADMIN_TOKEN, timezone="UTC"))["key"]
    r = await admin.post(f"/api/v1/studies/{study}/participants", json={"external_id": "P1", "enrolled_at": ENROLLED})
    assert r.status_code == 201 and r.json()["site"] is None
    r = await admin.post(f"/api/v1/studies/{study}/participants", json={"external_id": "P2", "enrolled_at": ENROLLED,
                                                                        "site": "north"})
    assert r.status_code == 422 and r.json()["errors"][0]["code"] == "unknown_site"


async def test_moving_a_participant_needs_a_whole_study_coordinator_and_is_audited(admin: httpx.AsyncClient) -> None:
    world = await two_site_study(admin)
    study = world["key"]
    coordinator = await site_token(admin, "coordinator", study, None)
    north = await site_token(admin, "coordinator", study, "north")
    r = await admin.post(f"/api/v1/studies/{study}/participants/NORTH-1/move", json={"site": "south", "reason": "x"},
                         headers=auth(north))
    assert r.status_code == 403
    r = await admin.post(f"/api/v1/studies/{study}/participants/NORTH-1/move", json={"site": "south"},
                         headers=auth(coordinator))
    assert r.status_code == 422
    r = await admin.post(f"/api/v1/studies/{study}/participants/NORTH-1/move",
                         json={"site": "south", "reason": "moved house"}, headers=auth(coordinator))
    assert r.status_code == 200, r.text
    assert r.json()["site"] == "south"
    # north no longer sees N1; the move and its reason are in the audit trail, attributed to the token
    assert (await admin.get(f"/api/v1/studies/{study}/participants/NORTH-1", headers=auth(north))).status_code == 404
    sites = {s["key"]: s["id"] for s in (await admin.get(f"/api/v1/studies/{study}/sites")).json()["items"]}
    audit = (await admin.get(f"/api/v1/studies/{study}/audit", params={"table": "participants",
                                                                      "action": "UPDATE"})).json()["items"]
    moved = [a for a in audit if "site_id" in (a["changed"] or [])]
    assert len(moved) == 1
    assert moved[0]["before"]["site_id"] == sites["north"] and moved[0]["after"]["site_id"] == sites["south"]
    coordinator_id = next(t["id"] for t in (await admin.get("/api/v1/tokens", params={"limit": 500})).json()["items"]
                          if t["label"] == "all coordinator" and t["study_key"] == study)
    assert moved[0]["actor"] == coordinator_id
    reason = (await admin.get(f"/api/v1/studies/{study}/audit",
                              params={"table": "participant_site_moves"})).json()["items"]
    assert len(reason) == 1 and reason[0]["after"]["reason"] == "moved house"
    assert reason[0]["after"]["from_site_id"] == sites["north"] and reason[0]["actor"] == coordinator_id


async def test_a_token_is_limited_to_a_site_of_its_study_only_when_that_makes_sense(admin: httpx.AsyncClient) -> None:
    world = await two_site_study(admin)
    study = world["key"]
    for body, loc in (({"role": "admin", "label": "x", "study_key": study, "site_key": "north"}, ["site_key"]),
                      ({"role": "coordinator", "label": "x", "site_key": "north"}, ["study_key"]),
                      ({"role": "coordinator", "label": "x", "study_key": study, "site_key": "west"}, ["site_key"])):
        r = await admin.post("/api/v1/tokens", json=body)
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == loc, (body, r.text)
    await site_token(admin, "collector", study, "north")
    listed = (await admin.get("/api/v1/tokens", params={"limit": 500})).json()["items"]
    assert [t["site_key"] for t in listed if t["study_key"] == study] == ["north"]


NORTH, SOUTH = {"NORTH-1", "NORTH-2"}, {"SOUTH-1", "SOUTH-2"}


def mentioned(text: str) -> set[str]:
    return {e for e in NORTH | SOUTH if e in text}


async def test_each_sites_tokens_see_only_their_site_everywhere_and_the_unscoped_both(
        app: Any, admin: httpx.AsyncClient) -> None:
    from tests.conftest import client_for

    world = await two_site_study(admin)
    study = world["key"]
    base = f"/api/v1/studies/{study}"
    coordinators = {site: await site_token(admin, "coordinator", study, site) for site in ("north", "south", None)}
    analysts = {site: await site_token(admin, "analyst", study, site) for site in ("north", "south", None)}
    redcap = {}
    for site in ("north", "south", None):
        body: dict[str, Any] = {"role": "coordinator", "label": f"rc {site}", "study_key": study, "format": "redcap"}
        if site:
            body["site_key"] = site
        redcap[site] = (await admin.post("/api/v1/tokens", json=body)).json()["token"]
    expected = {"north": NORTH, "south": SOUTH, None: NORTH | SOUTH}
    for site, token in coordinators.items():
        own, h = expected[site], auth(token)
        # API lists and reads
        listed = (await admin.get(f"{base}/participants", headers=h)).json()["items"]
        assert {p["external_id"] for p in listed} == own, site
        for external_id in NORTH | SOUTH:
            r = await admin.get(f"{base}/participants/{external_id}", headers=h)
            assert r.status_code == (200 if external_id in own else 404), (site, external_id)
            r = await admin.get(f"{base}/participants/{external_id}/reminders", headers=h)
            assert r.status_code == (200 if external_id in own else 404), (site, external_id)
            r = await admin.get(f"{base}/responses/{world['responses'][external_id]}", headers=h)
            assert r.status_code == (200 if external_id in own else 404), (site, external_id)
            r = await admin.patch(f"{base}/responses/{world['responses'][external_id]}", headers=h,
                                  json={"answers": {"age": 44}, "reason": "typo"})
            assert r.status_code == (200 if external_id in own else 404), (site, external_id, r.text)
            r = await admin.post(f"{base}/participants/{external_id}/withdraw", headers=h,
                                 json={"reason": "x", "withdrawn_at": "2100-01-01T00:00:00Z"})
            assert r.status_code in ((422,) if external_id in own else (404,)), (site, external_id, r.text)
        responses = (await admin.get(f"{base}/responses", headers=h)).json()["items"]
        assert {r["external_id"] for r in responses} == own
        followup = (await admin.get(f"{base}/followup", params={"wave": "baseline", "status": "completed"},
                                    headers=h)).json()["items"]
        assert {r["external_id"] for r in followup} == own
        # retention counts the site's participants only
        retention = (await admin.get(f"{base}/retention", headers=h)).json()["waves"][0]
        assert retention["wave"] == "baseline" and retention["completed"] == len(own), (site, retention)
        funnel = (await admin.get(f"{base}/reminders/funnel", headers=h)).json()["waves"][0]
        assert funnel["wave"] == "baseline" and funnel["completed"] == len(own), (site, funnel)
        # a collector's write for another site's participant: as if it did not exist
        other = sorted((NORTH | SOUTH) - own)
        if other:
            r = await admin.post(f"{base}/responses", headers=h, json={
                "external_id": other[0], "wave": "month6", "status": "partial", "answers": {}})
            assert r.status_code == 404
            # whole-study operations are refused
            for method, path in (("GET", f"{base}/audit"), ("GET", f"{base}/analyses"),
                                 ("POST", f"{base}/reminders:run"), ("PATCH", base), ("GET", f"{base}/webhooks")):
                r = await admin.request(method, path, headers=h, json={} if method == "PATCH" else None)
                assert r.status_code == 403, (site, method, path, r.text)
        # the dashboard's worklist
        async with client_for(app) as browser:
            assert (await browser.post("/ui/login", data={"token": token})).status_code == 303
            page = await browser.get(f"/ui/studies/{study}/followup", params={"wave": "baseline",
                                                                             "status": "completed"})
            assert page.status_code == 200 and mentioned(page.text) == own, site
            overview = await browser.get(f"/ui/studies/{study}")
            assert overview.status_code == 200
            assert ("Retention by site" in overview.text) == (site is None)
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert csrf is not None
            for stranger in sorted((NORTH | SOUTH) - own):  # reminding or withdrawing another site's: not found
                for action, form in (("remind", {"wave": "baseline"}), ("withdraw", {"reason": "x"})):
                    r = await browser.post(f"/ui/studies/{study}/followup/{stranger}/{action}",
                                           data={**form, "csrf": csrf.group(1)})
                    assert r.status_code == 404, (site, stranger, action, r.status_code)
        # REDCap records and DAGs, for a token bound to the same site
        r = await admin.post("/redcap/api/", data={"token": redcap[site], "content": "record", "format": "json",
                                                   "exportDataAccessGroups": "true"})
        assert r.status_code == 200, r.text
        assert {row["record_id"] for row in r.json()} == own
        assert {row["redcap_data_access_group"] for row in r.json()} == ({site} if site else {"north", "south"})
        dags = await admin.post("/redcap/api/", data={"token": redcap[site], "content": "dag", "format": "json"})
        assert {d["unique_group_name"] for d in dags.json()} == ({site} if site else {"north", "south"})
        # FHIR search
        bundle = await admin.get("/fhir/QuestionnaireResponse", headers=h)
        assert bundle.status_code == 200 and mentioned(bundle.text) == own, site
    everyone = (await admin.get(f"{base}/participants")).json()["items"]
    assert {p["status"] for p in everyone} == {"active"}, "no site's token withdrew another site's participant"
    for site, token in analysts.items():
        export = await admin.get(f"{base}/export", headers=auth(token))
        assert export.status_code == 200
        header, *rows = export.text.strip().splitlines()
        assert header.split(",")[:3] == ["participant", "site", "wave"]
        assert len(rows) == len(expected[site]) and {r.split(",")[1] for r in rows} == (
            {site} if site else {"north", "south"})
    wide = await admin.get(f"{base}/export", params={"layout": "wide"}, headers=auth(analysts["south"]))
    header, *rows = wide.text.strip().splitlines()
    assert header.split(",")[:2] == ["participant", "site"] and [r.split(",")[1] for r in rows] == ["south"] * 2
    parquet = await admin.get(f"{base}/export", params={"format": "parquet"}, headers=auth(analysts["north"]))
    assert set(pd.read_parquet(io.BytesIO(parquet.content))["site"]) == {"north"}
    outcomes = (await admin.get(f"{base}/outcomes", params={"by": "site"})).json()["items"]
    assert {(o["wave"], o["group"]) for o in outcomes} == {("baseline", "north"), ("baseline", "south")}
    north_only = (await admin.get(f"{base}/outcomes", params={"by": "site"},
                                  headers=auth(coordinators["north"]))).json()["items"]
    assert {o["group"] for o in north_only} == {"north"}
    by_site = (await admin.get(f"{base}/retention", params={"by": "site"})).json()
    assert {g["group"]: g["waves"][0]["completed"] for g in by_site["groups"]} == {"north": 2, "south": 2}


async def test_redcap_import_assigns_data_access_groups_as_redcap_does(admin: httpx.AsyncClient) -> None:
    world = await two_site_study(admin)
    study = world["key"]
    tokens = {}
    for site in ("north", None):
        body: dict[str, Any] = {"role": "coordinator", "label": f"rc {site}", "study_key": study, "format": "redcap"}
        if site:
            body["site_key"] = site
        tokens[site] = (await admin.post("/api/v1/tokens", json=body)).json()["token"]
    collector = (await admin.post("/api/v1/tokens", json={"role": "collector", "label": "rc collector",
                                                          "study_key": study, "format": "redcap"})).json()["token"]

    async def post(token: str, rows: list[dict[str, str]]) -> httpx.Response:
        return await admin.post("/redcap/api/", data={"token": token, "content": "record", "format": "json",
                                                      "data": json.dumps(rows)})

    # a user in a DAG may not put a record in another one, nor reach another DAG's records
    r = await post(tokens["north"], [{"record_id": "NORTH-1", "redcap_event_name": "baseline_arm_1",
                                      "redcap_data_access_group": "south"}])
    assert r.status_code == 400 and "not a data access group" in r.text
    r = await post(tokens["north"], [{"record_id": "SOUTH-1", "redcap_event_name": "baseline_arm_1",
                                      "redcap_data_access_group": "north"}])
    assert r.status_code == 400 and "does not exist" in r.text
    r = await post(tokens[None], [{"record_id": "NORTH-1", "redcap_event_name": "baseline_arm_1",
                                   "redcap_data_access_group": "west"}])
    assert r.status_code == 400 and "not a data access group" in r.text
    unknown, elsewhere = r.text, (await post(tokens["north"], [{
        "record_id": "NORTH-1", "redcap_event_name": "baseline_arm_1", "redcap_data_access_group": "south"}])).text
    assert unknown.replace("west", "?") == elsewhere.replace("south", "?")  # no way to tell a site exists
    # moving takes what POST .../move takes: a collector's import cannot move a record
    r = await post(collector, [{"record_id": "NORTH-1", "redcap_event_name": "baseline_arm_1",
                                "redcap_data_access_group": "south"}])
    assert r.status_code == 400 and "coordinator" in r.text
    assert (await admin.get(f"/api/v1/studies/{study}/participants/NORTH-1")).json()["site"] == "north"
    # a user in no DAG assigns: the record moves, audited with the import as its reason; no response is made
    r = await post(tokens[None], [{"record_id": "NORTH-1", "redcap_event_name": "month6_arm_1",
                                   "redcap_data_access_group": "south"}])
    assert r.status_code == 200, r.text
    assert (await admin.get(f"/api/v1/studies/{study}/participants/NORTH-1")).json()["site"] == "south"
    assert (await admin.get(f"/api/v1/studies/{study}/responses",
                            params={"external_id": "NORTH-1", "wave": "month6"})).json()["items"] == []
    moves = (await admin.get(f"/api/v1/studies/{study}/audit", params={"table": "participant_site_moves"})).json()
    assert [m["after"]["reason"] for m in moves["items"]] == ["REDCap record import (redcap_data_access_group)"]
    r = await admin.post("/redcap/api/", data={"token": tokens["north"], "content": "dag", "action": "import",
                                               "format": "json", "data": "[]"})
    assert r.status_code == 400 and "sites" in r.text
