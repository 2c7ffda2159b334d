from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN
from tests.factories import auth, create_study, create_token, minimal_codebook, pal_codebook, unique_key

pytestmark = pytest.mark.anyio

SHARED_CODEBOOK = Path(__file__).resolve().parents[2] / "shared" / "codebook" / "pal-v1.json"


def test_the_shipped_codebook_is_the_shared_one() -> None:
    if not SHARED_CODEBOOK.exists():
        pytest.skip("../shared/codebook is not next to this checkout")
    shipped = pal_codebook()
    # the copy adds an evaluable `expression` beside the two prose definitions, and nothing else
    expressions = {d["code"]: d.pop("expression") for d in shipped["derived"] if "expression" in d}
    assert expressions == {"involvement_score": "home_group + has_sponsor + service_30d + program_work_30d + "
                                                "weekly_attendance",
                           "aud_severity": "count(aud_1..aud_11)"}
    assert shipped == json.loads(SHARED_CODEBOOK.read_text())


async def test_template_study_serves_the_codebook_exactly(admin: httpx.AsyncClient) -> None:
    study = await create_study(admin, ADMIN_TOKEN, key="pal-a")
    assert study["waves"] == ["baseline", "month6", "month12"]
    assert study["codebook"]["key"] == "pal-v1"
    served = (await admin.get("/api/v1/studies/pal-a/instruments")).json()["items"]
    expected = pal_codebook()["instruments"]
    # codes, types, ranges, options, waves and conditions: the whole documents are equal
    assert served == expected
    items = {it["code"]: it for inst in served for it in inst["items"]}
    assert items["age"]["min"] == 18 and items["age"]["max"] == 99
    assert items["home_group"]["enable_when"] == {"item": "primary_group", "operator": "not_in", "value": ["none"]}
    codebook = (await admin.get("/api/v1/studies/pal-a/codebook")).json()
    assert codebook == pal_codebook()


async def test_template_waves_follow_the_contract(admin: httpx.AsyncClient) -> None:
    await create_study(admin, ADMIN_TOKEN, key="pal-w")
    r = await admin.get("/api/v1/studies/pal-w/waves")
    assert r.status_code == 200
    waves = [(w["key"], w["offset_days"], w["window_open_days"], w["window_close_days"]) for w in r.json()["items"]]
    assert waves == [("baseline", 0, 0, 30), ("month6", 182, 168, 228), ("month12", 365, 351, 411)]
    policy = r.json()["items"][1]["reminder_policy"]
    assert policy["reminder_days_after_open"] == [7, 14] and policy["final_days_before_close"] == 3


async def test_get_study_and_location(admin: httpx.AsyncClient) -> None:
    r = await admin.post("/api/v1/studies", json={"key": "loc-1", "name": "n", "timezone": "Europe/Berlin"})
    assert r.status_code == 201
    assert r.headers["location"] == "/api/v1/studies/loc-1"
    got = (await admin.get("/api/v1/studies/loc-1")).json()
    assert got["timezone"] == "Europe/Berlin" and got["codebook"] is None and got["waves"] == []


async def test_duplicate_key_is_409_and_keeps_the_first(admin: httpx.AsyncClient) -> None:
    await create_study(admin, ADMIN_TOKEN, key="dup-study")
    r = await admin.post("/api/v1/studies", json={"key": "dup-study", "name": "other", "timezone": "UTC"})
    assert r.status_code == 409
    assert r.headers["content-type"].startswith("application/problem+json")
    assert (await admin.get("/api/v1/studies/dup-study")).json()["name"] == "PAL replication"


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"key": "Bad Key", "name": "n", "timezone": "UTC"}, ["key"]),
        ({"key": "x", "name": "n", "timezone": "UTC"}, ["key"]),
        ({"key": "ok-key", "name": "", "timezone": "UTC"}, ["name"]),
        ({"key": "ok-key", "name": "n", "timezone": "Mars/Olympus"}, ["timezone"]),
        ({"key": "ok-key", "name": "n", "timezone": "UTC", "template": "unknown"}, ["template"]),
        ({"key": "ok-key", "name": "n", "timezone": "UTC", "colour": "red"}, ["colour"]),
        ({"key": "ok-key", "name": "n"}, ["timezone"]),
    ],
)
async def test_bad_study_payloads_name_the_field(admin: httpx.AsyncClient, body: dict[str, Any],
                                                 loc: list[str]) -> None:
    r = await admin.post("/api/v1/studies", json=body)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert {"type", "title", "status", "detail"} <= problem.keys()
    assert loc in [e["loc"] for e in problem["errors"]]


async def test_unknown_study_is_404(admin: httpx.AsyncClient) -> None:
    r = await admin.get("/api/v1/studies/no-such-study")
    assert r.status_code == 404
    assert r.json()["status"] == 404


async def test_uploaded_codebook_is_validated_and_served(admin: httpx.AsyncClient) -> None:
    document = minimal_codebook()
    r = await admin.post("/api/v1/studies", json={"key": "mini", "name": "Mini", "timezone": "UTC",
                                                  "codebook": document})
    assert r.status_code == 201, r.text
    assert r.json()["waves"] == ["intake", "week4"]
    assert (await admin.get("/api/v1/studies/mini/codebook")).json() == document
    waves = (await admin.get("/api/v1/studies/mini/waves")).json()["items"]
    assert waves[0]["reminder_policy"]["reminder_days_after_open"] == [3]


def _item(document: dict[str, Any], index: int) -> dict[str, Any]:
    item: dict[str, Any] = document["instruments"][0]["items"][index]
    return item


def _broken(kind: str) -> tuple[dict[str, Any], list[Any], str]:
    doc = minimal_codebook()
    items = ["codebook", "instruments", 0, "items"]
    if kind == "duplicate_code":
        _item(doc, 1)["code"] = "drinks_week"
        return doc, [*items, 1, "code"], "duplicate"
    if kind == "unknown_type":
        _item(doc, 0)["type"] = "float"
        return doc, [*items, 0, "type"], "literal_error"
    if kind == "enable_when_unknown_item":
        _item(doc, 2)["enable_when"]["item"] = "vaping"
        return doc, [*items, 2, "enable_when", "item"], "unknown_reference"
    if kind == "enable_when_bad_value":
        _item(doc, 2)["enable_when"] = {"item": "mood", "operator": "in", "value": ["great"]}
        return doc, [*items, 2, "enable_when", "value"], "option"
    if kind == "enable_when_self":
        _item(doc, 2)["enable_when"]["item"] = "cigs_day"
        return doc, [*items, 2, "enable_when", "item"], "self_reference"
    if kind == "enable_when_other_wave":
        _item(doc, 1)["enable_when"] = {"item": "mood", "operator": "==", "value": "good"}
        return doc, [*items, 1, "enable_when", "item"], "reference_not_in_wave"
    if kind == "rule_unknown_item":
        doc["rules"] = [{"code": "r1", "left": "drinks_week", "operator": "<=", "right": "drinks_month",
                         "message": "m"}]
        return doc, ["codebook", "rules", 0, "right"], "unknown_reference"
    if kind == "rule_non_numeric":
        doc["rules"] = [{"code": "r1", "left": "mood", "operator": "<", "right": "drinks_week", "message": "m"}]
        return doc, ["codebook", "rules", 0, "left"], "type"
    if kind == "rule_bad_operator":
        doc["rules"] = [{"code": "r1", "left": "drinks_week", "operator": "<<", "right": 3, "message": "m"}]
        return doc, ["codebook", "rules", 0, "operator"], "literal_error"
    if kind == "unknown_wave":
        _item(doc, 0)["waves"] = ["intake", "month99"]
        return doc, [*items, 0, "waves"], "unknown_wave"
    if kind == "min_above_max":
        _item(doc, 0)["min"] = 500
        return doc, [*items, 0, "min"], "range"
    if kind == "choice_without_options":
        del _item(doc, 3)["options"]
        return doc, [*items, 3, "options"], "options_required"
    if kind == "derived_not_an_expression":
        doc["derived"] = [{"code": "risky", "type": "boolean", "definition": "__import__('os').system('x')"}]
        return doc, ["codebook", "derived", 0, "definition"], "definition"
    if kind == "derived_unknown_item":
        doc["derived"] = [{"code": "risky", "type": "boolean", "definition": "units > 3"}]
        return doc, ["codebook", "derived", 0, "definition"], "definition"
    if kind == "duplicate_wave":
        doc["waves"][1]["key"] = "intake"
        return doc, ["codebook", "waves", 1, "key"], "duplicate"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", [
    "duplicate_code", "unknown_type", "enable_when_unknown_item", "enable_when_bad_value", "enable_when_self",
    "enable_when_other_wave", "rule_unknown_item", "rule_non_numeric", "rule_bad_operator", "unknown_wave",
    "min_above_max", "choice_without_options", "derived_not_an_expression", "derived_unknown_item",
    "duplicate_wave",
])
async def test_bad_codebooks_are_422_with_the_path_of_each_problem(admin: httpx.AsyncClient, kind: str) -> None:
    document, loc, code = _broken(kind)
    key = unique_key("bad")
    r = await admin.post("/api/v1/studies", json={"key": key, "name": "n", "timezone": "UTC", "codebook": document})
    assert r.status_code == 422, r.text
    found = [(e["loc"], e["code"]) for e in r.json()["errors"]]
    assert (loc, code) in found, found
    assert (await admin.get(f"/api/v1/studies/{key}")).status_code == 404


async def test_several_problems_are_all_reported(admin: httpx.AsyncClient) -> None:
    doc = minimal_codebook()
    _item(doc, 1)["code"] = "drinks_week"
    _item(doc, 2)["enable_when"]["item"] = "nothing"
    doc["rules"] = [{"code": "r", "left": "ghost", "operator": "<", "right": 1, "message": "m"}]
    r = await admin.post("/api/v1/studies", json={"key": "many-bad", "name": "n", "timezone": "UTC",
                                                  "codebook": doc})
    assert r.status_code == 422
    assert len(r.json()["errors"]) >= 3


async def test_studies_are_paginated(admin: httpx.AsyncClient) -> None:
    keys = {f"page-{i:02d}" for i in range(7)}
    for key in keys:
        r = await admin.post("/api/v1/studies", json={"key": key, "name": key, "timezone": "UTC"})
        assert r.status_code == 201
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        body = (await admin.get("/api/v1/studies", params=params)).json()
        assert len(body["items"]) <= 3
        seen += [s["key"] for s in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert keys <= set(seen) and len(seen) == len(set(seen))
    r = await admin.get("/api/v1/studies", params={"cursor": "garbage!"})
    assert r.status_code == 400
    r = await admin.get("/api/v1/studies", params={"limit": 501})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "limit"]


async def test_a_study_scoped_token_sees_only_its_study(admin: httpx.AsyncClient) -> None:
    await create_study(admin, ADMIN_TOKEN, key="scope-a")
    await create_study(admin, ADMIN_TOKEN, key="scope-b")
    token = await create_token(admin, ADMIN_TOKEN, "coordinator", study_key="scope-a")
    assert (await admin.get("/api/v1/studies/scope-a", headers=auth(token))).status_code == 200
    r = await admin.get("/api/v1/studies/scope-b", headers=auth(token))
    assert r.status_code == 403
    listed = (await admin.get("/api/v1/studies", headers=auth(token))).json()["items"]
    assert [s["key"] for s in listed] == ["scope-a"]
