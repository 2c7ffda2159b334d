"""The service attacked as an adversary (and a careless client) would, over real HTTP.

Everything here runs against a live server (uvicorn on a loopback port, real commits), and the
requests are generated from the service's own OpenAPI document, so a new operation is attacked
the day it is added: study-scoped tokens against another study, NUL bytes in every string
parameter and body field, extreme dates in every date field, JSON nested too deep. Zero 5xx is
an assertion throughout.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import random
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy.engine import URL

from tests.conftest import ADMIN_TOKEN, LiveServer, clone_database, drop_database, make_settings, serve_app
from tests.factories import auth, minimal_codebook, valid_answers

pytestmark = pytest.mark.slow

ROLES = ("admin", "coordinator", "collector", "analyst")
EXTREME_INSTANTS = ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
                    "1899-12-31T23:59:59Z", "2200-01-01T00:00:00Z")


@pytest.fixture(scope="module")
def server(template_db: URL, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db_url = clone_database(template_db)
    try:
        with serve_app(make_settings(db_url, tmp_path_factory.mktemp("adversarial")), db_url) as live:
            yield live
    finally:
        drop_database(db_url)


@pytest.fixture(scope="module")
def admin(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN), timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def world(admin: httpx.Client) -> dict[str, Any]:
    """Two studies, A and B, each with a participant, a complete baseline response and a fit."""
    out: dict[str, Any] = {}
    for name in ("a", "b"):
        key = f"adv-{name}-{uuid.uuid4().hex[:6]}"
        assert admin.post("/api/v1/studies", json={"key": key, "name": f"Study {name}", "timezone": "UTC",
                                                   "template": "pal-replication"}).status_code == 201
        hook = admin.post(f"/api/v1/studies/{key}/webhooks", json={"url": "https://93.184.215.14/hook",
                                                                   "events": ["participant.enrolled"]})
        assert hook.status_code == 201, hook.text
        enrolled = (datetime.now(UTC) - timedelta(days=1)).isoformat()
        assert admin.post(f"/api/v1/studies/{key}/participants", json={
            "external_id": "P1", "enrolled_at": enrolled, "contact": {"email": "p1@example.org"}}).status_code == 201
        response = admin.post(f"/api/v1/studies/{key}/responses", json={
            "external_id": "P1", "wave": "baseline", "status": "complete",
            "answers": valid_answers("baseline", random.Random(3))})
        assert response.status_code == 201, response.text
        analysis = admin.post(f"/api/v1/studies/{key}/analyses", json={"model": "table1"})
        assert analysis.status_code == 202, analysis.text
        token = admin.post("/api/v1/tokens", json={"role": "coordinator", "label": f"{name} coord",
                                                   "study_key": key})
        out[name] = {"key": key, "external_id": "P1", "wave": "baseline", "response_id": response.json()["id"],
                     "analysis_id": analysis.json()["id"], "token_id": token.json()["id"], "token": "not-a-link",
                     "webhook_id": hook.json()["id"],
                     "delivery_id": admin.get(f"/api/v1/studies/{key}/webhooks/{hook.json()['id']}/deliveries")
                     .json()["items"][0]["id"]}
    return out


def scoped_tokens(admin: httpx.Client, study_key: str) -> dict[str, str]:
    tokens = {}
    for role in ROLES:
        r = admin.post("/api/v1/tokens", json={"role": role, "label": f"scoped {role}", "study_key": study_key})
        assert r.status_code == 201, r.text
        tokens[role] = r.json()["token"]
    return tokens


def operations(client: httpx.Client) -> list[tuple[str, str, dict[str, Any]]]:
    document = client.get("/openapi.json").json()
    out = []
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            out.append((method.upper(), path, op))
    return out


def _schema(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _types(document: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    schema = _schema(document, schema)
    kinds = {schema.get("type", "")} | {schema.get("format", "")}
    for option in schema.get("anyOf", []) + schema.get("oneOf", []):
        kinds |= _types(document, option)
    return kinds


def body_properties(document: dict[str, Any], op: dict[str, Any]) -> dict[str, set[str]]:
    """The top-level fields of an operation's JSON body, with their types and formats."""
    content = op.get("requestBody", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema")
    if schema is None:
        return {}
    resolved = _schema(document, schema)
    return {name: _types(document, prop) for name, prop in resolved.get("properties", {}).items()}


def fill(path: str, values: dict[str, str]) -> str:
    return path.format(**{k: quote(v, safe="") for k, v in values.items()})


# -- scope -------------------------------------------------------------------------------------


def test_a_scoped_token_of_any_role_reaches_nothing_of_another_study(server: LiveServer, admin: httpx.Client,
                                                                     world: dict[str, Any]) -> None:
    tokens = scoped_tokens(admin, world["b"]["key"])
    document = admin.get("/openapi.json").json()
    failures = []
    checked = 0
    for method, path, op in operations(admin):
        if "{key}" not in path and "{analysis_id}" not in path:
            continue
        url = fill(path, world["a"])
        for role, secret in tokens.items():
            kwargs: dict[str, Any] = {"headers": auth(secret)}
            if "requestBody" in op:
                kwargs["json"] = {}
            r = httpx.request(method, server.url + url, timeout=30, **kwargs)
            checked += 1
            if r.status_code not in (403, 404):
                failures.append(f"{role} {method} {url}: {r.status_code} {r.text[:120]}")
    assert checked > 100
    assert not failures, "\n".join(failures)
    # and the same operations on the token's own study are not refused for scope
    own = httpx.get(f"{server.url}/api/v1/studies/{world['b']['key']}", headers=auth(tokens["coordinator"]))
    assert own.status_code == 200
    assert document["paths"]


@pytest.fixture(scope="module")
def sited(admin: httpx.Client) -> dict[str, Any]:
    """A study with sites north and south, one participant in each with a complete baseline response."""
    key = f"adv-sites-{uuid.uuid4().hex[:6]}"
    assert admin.post("/api/v1/studies", json={"key": key, "name": "Sited", "timezone": "UTC",
                                               "template": "pal-replication"}).status_code == 201
    out: dict[str, Any] = {"key": key}
    for site in ("north", "south"):
        assert admin.post(f"/api/v1/studies/{key}/sites", json={"key": site, "name": site}).status_code == 201
        external_id = f"{site.upper()}-ADV-1"
        enrolled = (datetime.now(UTC) - timedelta(days=1)).isoformat()
        r = admin.post(f"/api/v1/studies/{key}/participants", json={
            "external_id": external_id, "enrolled_at": enrolled, "site": site,
            "contact": {"email": f"{site}@example.org"}})
        assert r.status_code == 201, r.text
        response = admin.post(f"/api/v1/studies/{key}/responses", json={
            "external_id": external_id, "wave": "baseline", "status": "complete",
            "answers": valid_answers("baseline", random.Random(5))})
        assert response.status_code == 201, response.text
        out[site] = {"external_id": external_id, "response_id": response.json()["id"]}
    return out


SITE_BODIES = {  # valid bodies, so that only the site scope can refuse these writes
    ("POST", "/api/v1/studies/{key}/participants/{external_id}/withdraw"): {"reason": "x"},
    ("POST", "/api/v1/studies/{key}/participants/{external_id}/reminders"): {"wave": "baseline"},
    ("POST", "/api/v1/studies/{key}/participants/{external_id}/move"): {"site": "north", "reason": "x"},
    ("PATCH", "/api/v1/studies/{key}/responses/{response_id}"): {"answers": {"age": 40}, "reason": "x"},
}


def test_a_site_scoped_token_of_any_role_reaches_nothing_of_another_site(server: LiveServer, admin: httpx.Client,
                                                                         sited: dict[str, Any]) -> None:
    """The token matrix, one level down: north's tokens against south's participant and response.
    What names south's participant is 403 or 404 (an error may echo the id asked for); no answer that
    succeeds shows it; whole-study operations are 403."""
    key, south = sited["key"], sited["south"]
    tokens = {}
    for role in ("coordinator", "collector", "analyst"):
        r = admin.post("/api/v1/tokens", json={"role": role, "label": f"north {role}", "study_key": key,
                                               "site_key": "north"})
        assert r.status_code == 201, r.text
        tokens[role] = r.json()["token"]
    values = {"key": key, "external_id": south["external_id"], "response_id": south["response_id"],
              "wave": "baseline", "webhook_id": str(uuid.uuid4()), "delivery_id": str(uuid.uuid4()),
              "analysis_id": str(uuid.uuid4()), "token_id": str(uuid.uuid4()), "token": "not-a-link"}
    failures = []
    checked = 0
    for method, path, op in operations(admin):
        if "{key}" not in path:
            continue
        url = fill(path, values)
        names_south = "{external_id}" in path or "{response_id}" in path
        body = SITE_BODIES.get((method, path))
        for role, secret in tokens.items():
            kwargs: dict[str, Any] = {"headers": auth(secret)}
            if "requestBody" in op:
                kwargs["json"] = body if body is not None else {}
            r = httpx.request(method, server.url + url, timeout=30, **kwargs)
            checked += 1
            refused = (403, 404) if body is not None or "requestBody" not in op else (403, 404, 422)
            if r.status_code >= 500:
                failures.append(f"{role} {method} {url}: {r.status_code}")
            elif op.get("x-whole-study") and r.status_code != 403:
                failures.append(f"{role} {method} {url}: whole-study operation answered {r.status_code}")
            elif names_south and r.status_code not in refused:
                failures.append(f"{role} {method} {url}: {r.status_code} {r.text[:120]}")
            elif r.status_code < 400 and (south["external_id"] in r.text or south["response_id"] in r.text):
                failures.append(f"{role} {method} {url}: shows south's participant")
    assert checked > 100
    assert not failures, "\n".join(failures)
    # nothing of south changed, and north's own participant is reachable
    assert admin.get(f"/api/v1/studies/{key}/participants/{south['external_id']}").json()["status"] == "active"
    own = httpx.get(f"{server.url}/api/v1/studies/{key}/participants/{sited['north']['external_id']}",
                    headers=auth(tokens["coordinator"]))
    assert own.status_code == 200 and own.json()["site"] == "north"


def test_a_scoped_admin_manages_only_its_own_studys_tokens_and_audit(server: LiveServer, admin: httpx.Client,
                                                                      world: dict[str, Any]) -> None:
    a, b = world["a"], world["b"]
    scoped_admin = scoped_tokens(admin, b["key"])["admin"]
    with httpx.Client(base_url=server.url, headers=auth(scoped_admin), timeout=30) as client:
        # no unscoped token, no token of another study
        for body in ({"role": "admin", "label": "escape"}, {"role": "admin", "label": "x", "study_key": None},
                     {"role": "coordinator", "label": "x", "study_key": a["key"]}):
            r = client.post("/api/v1/tokens", json=body)
            assert r.status_code == 403, (body, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
        made = client.post("/api/v1/tokens", json={"role": "coordinator", "label": "mine", "study_key": b["key"]})
        assert made.status_code == 201 and made.json()["study_key"] == b["key"]
        # listing shows its study's tokens only
        listed = client.get("/api/v1/tokens", params={"limit": 500}).json()["items"]
        assert listed and {t["study_key"] for t in listed} == {b["key"]}
        # another study's token cannot be revoked (nor learned of), and stays active
        assert client.delete(f"/api/v1/tokens/{a['token_id']}").status_code == 404
        assert admin.get("/api/v1/tokens", params={"limit": 500}).json()["items"]
        still = [t for t in admin.get("/api/v1/tokens", params={"limit": 500}).json()["items"]
                 if t["id"] == a["token_id"]]
        assert still and still[0]["revoked_at"] is None
        # its own can
        assert client.delete(f"/api/v1/tokens/{made.json()['id']}").status_code == 204
        # the global audit shows its study only; the unscoped admin sees both
        rows = client.get("/api/v1/audit", params={"limit": 500}).json()["items"]
        everything = admin.get("/api/v1/audit", params={"limit": 500}).json()["items"]
        assert rows and len(rows) < len(everything)
        a_rows = admin.get(f"/api/v1/studies/{a['key']}/audit", params={"limit": 500}).json()["items"]
        assert not {r["id"] for r in a_rows} & {r["id"] for r in rows}
        # scoped tokens create no studies
        r = client.post("/api/v1/studies", json={"key": f"esc-{uuid.uuid4().hex[:6]}", "name": "x", "timezone": "UTC"})
        assert r.status_code == 403
    coordinator = scoped_tokens(admin, b["key"])["coordinator"]
    r = httpx.post(f"{server.url}/api/v1/studies", headers=auth(coordinator),
                   json={"key": f"esc-{uuid.uuid4().hex[:6]}", "name": "x", "timezone": "UTC"})
    assert r.status_code == 403


def test_scoped_tokens_stay_in_their_study_on_fhir_redcap_and_the_dashboard(server: LiveServer, admin: httpx.Client,
                                                                           world: dict[str, Any]) -> None:
    a, b = world["a"], world["b"]
    tokens = scoped_tokens(admin, b["key"])
    r = httpx.get(f"{server.url}/fhir/Questionnaire/{a['key']}-demographics", headers=auth(tokens["coordinator"]))
    assert r.status_code in (403, 404) and r.json()["resourceType"] == "OperationOutcome"
    r = httpx.get(f"{server.url}/fhir/QuestionnaireResponse", headers=auth(tokens["admin"]),
                  params={"questionnaire": f"{a['key']}-demographics"})
    assert r.status_code in (403, 404)
    # a REDCap token is its study's project: records of another study are not reachable with it
    redcap = admin.post("/api/v1/tokens", json={"role": "coordinator", "label": "rc", "study_key": b["key"],
                                                "format": "redcap"}).json()["token"]
    r = httpx.post(f"{server.url}/redcap/api/", data={"token": redcap, "content": "record", "format": "json"})
    assert r.status_code == 200
    # B's own P1 only: its one baseline response, with B's answers
    b_answers = admin.get(f"/api/v1/studies/{b['key']}/responses/{b['response_id']}").json()["answers"]
    assert [row["record_id"] for row in r.json() if row["redcap_event_name"] == "baseline_arm_1"] == ["P1"]
    baseline = next(row for row in r.json() if row["redcap_event_name"] == "baseline_arm_1")
    assert str(baseline["age"]) == str(b_answers["age"])
    with httpx.Client(base_url=server.url, follow_redirects=False, timeout=30) as browser:
        assert browser.post("/ui/login", data={"token": tokens["admin"]}).status_code == 303
        page = browser.get(f"/ui/studies/{a['key']}/overview")
        assert page.status_code in (403, 404)
        assert "Study a" not in page.text


def test_an_analyst_cannot_link_a_pseudonym_to_an_external_id(server: LiveServer, admin: httpx.Client,
                                                              world: dict[str, Any]) -> None:
    b = world["b"]
    analyst = admin.post("/api/v1/tokens", json={"role": "analyst", "label": "an"}).json()["token"]
    with httpx.Client(base_url=server.url, headers=auth(analyst), timeout=30) as client:
        r = client.get(f"/api/v1/studies/{b['key']}/responses", params={"external_id": "P1"})
        assert r.status_code == 403
        everyone = client.get(f"/api/v1/studies/{b['key']}/responses").json()["items"]
        assert everyone and all(item["external_id"] is None for item in everyone)
        pseudonym = everyone[0]["pseudonym"]
        mine = client.get(f"/api/v1/studies/{b['key']}/responses", params={"pseudonym": pseudonym}).json()["items"]
        assert [i["id"] for i in mine] == [everyone[0]["id"]]
        assert client.get(f"/api/v1/studies/{b['key']}/responses",
                          params={"pseudonym": "0" * 16}).json()["items"] == []


# -- bytes no handler can store -------------------------------------------------------------------


def test_nul_in_every_string_parameter_and_body_field_is_a_400_naming_it(server: LiveServer, admin: httpx.Client,
                                                                          world: dict[str, Any]) -> None:
    document = admin.get("/openapi.json").json()
    failures: list[str] = []
    tried = 0
    for method, path, op in operations(admin):
        values = dict(world["a"])
        for param in op.get("parameters", []):
            name, where = param["name"], param["in"]
            if where not in ("path", "query"):
                continue
            if where == "path":
                url = fill(path, {**values, name: "x\x00y"})
                params = {}
            else:
                url = fill(path, values)
                params = {name: "x\x00y"}
            r = admin.request(method, url, params=params, json={} if "requestBody" in op else None)
            tried += 1
            names = [e["loc"][-1] for e in r.json().get("errors", [])] if r.status_code == 400 else []
            if r.status_code != 400 or name not in names:
                failures.append(f"{method} {path} {where} {name}: {r.status_code} {r.text[:150]}")
        for name in body_properties(document, op):
            r = admin.request(method, fill(path, values), json={name: "x\x00y"})
            tried += 1
            if r.status_code != 400 or [name] not in [e["loc"] for e in r.json().get("errors", [])]:
                failures.append(f"{method} {path} body {name}: {r.status_code} {r.text[:150]}")
    assert tried > 60
    assert not failures, "\n".join(failures)


def test_nul_reaches_no_adapter_or_page(server: LiveServer, admin: httpx.Client, world: dict[str, Any]) -> None:
    a = world["a"]
    r = httpx.get(f"{server.url}/fhir/QuestionnaireResponse", headers=auth(ADMIN_TOKEN),
                  params={"subject": "P\x001", "questionnaire": f"{a['key']}-demographics"})
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    r = httpx.post(f"{server.url}/redcap/api/", data={"token": "X" * 32, "content": "record", "record": "P\x001"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{server.url}/ui/login", data={"token": "coh_\x00"})
    assert r.status_code == 400
    r = httpx.post(f"{server.url}/api/v1/studies/{a['key']}/participants:import",
                   headers={**auth(ADMIN_TOKEN), "content-type": "text/csv"},
                   content=b"external_id,enrolled_at\nP\x009,2026-01-01T00:00:00Z\n")
    assert r.status_code == 400


def test_extreme_dates_in_every_date_field_are_refused_clearly(server: LiveServer, admin: httpx.Client,
                                                               world: dict[str, Any]) -> None:
    document = admin.get("/openapi.json").json()
    failures: list[str] = []
    tried = 0
    for method, path, op in operations(admin):
        url = fill(path, world["a"])
        for param in op.get("parameters", []):
            if param["in"] == "query" and _types(document, param.get("schema", {})) & {"date-time", "date"}:
                for value in EXTREME_INSTANTS:
                    r = admin.request(method, url, params={param["name"]: value},
                                      json={} if "requestBody" in op else None)
                    tried += 1
                    if r.status_code != 422 or "1900" not in r.text:
                        failures.append(f"{method} {path} ?{param['name']}={value}: {r.status_code} {r.text[:150]}")
        for name, kinds in body_properties(document, op).items():
            if kinds & {"date-time", "date"}:
                for value in EXTREME_INSTANTS:
                    r = admin.request(method, url, json={name: value})
                    tried += 1
                    locs = [e["loc"] for e in r.json().get("errors", [])] if r.status_code == 422 else []
                    if [name] not in locs:
                        failures.append(f"{method} {path} body {name}={value}: {r.status_code} {r.text[:150]}")
    assert tried >= 20
    assert not failures, "\n".join(failures)
    # imports, partial or not, JSON or CSV: the row is reported, nothing else is stored
    key = world["a"]["key"]
    for partial in ("false", "true"):
        r = admin.post(f"/api/v1/studies/{key}/participants:import", params={"partial": partial},
                       json=[{"external_id": f"X{partial}", "enrolled_at": "0001-01-01T00:00:00Z"}])
        assert r.status_code in (200, 422), r.text
        assert r.json()["errors"][0]["loc"][-1] == "enrolled_at"
        csv_body = f"external_id,enrolled_at\nY{partial},9999-12-31T23:59:59-14:00\n"
        r = admin.post(f"/api/v1/studies/{key}/participants:import", params={"partial": partial},
                       content=csv_body, headers={"content-type": "text/csv"})
        assert r.status_code in (200, 422), r.text
    assert admin.get(f"/api/v1/studies/{key}/participants/Xtrue").status_code == 404
    # the reminder scan's clock and the dashboard's day
    r = admin.post(f"/api/v1/studies/{key}/reminders:run", params={"now": "9999-12-31T23:59:59-14:00"})
    assert r.status_code == 422
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        browser.post("/ui/login", data={"token": ADMIN_TOKEN})
        r = browser.get(f"/ui/studies/{key}/overview", params={"as_of": "9999-12-31"})
        assert 400 <= r.status_code < 500


def test_json_nested_ten_thousand_deep_is_a_400_everywhere(server: LiveServer, admin: httpx.Client,
                                                           world: dict[str, Any]) -> None:
    key = world["a"]["key"]
    deep = "[" * 10_000 + "]" * 10_000
    for path in (f"/api/v1/studies/{key}/participants:import", f"/api/v1/studies/{key}/responses",
                 "/api/v1/tokens", f"/api/v1/studies/{key}/codebook"):
        method = "PUT" if path.endswith("codebook") else "POST"
        r = admin.request(method, path, content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, r.text[:200])
        assert r.json()["errors"][0]["code"] == "too_deep"
    r = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", content=deep,
                   headers={**auth(ADMIN_TOKEN), "content-type": "application/fhir+json"})
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    r = httpx.post(f"{server.url}/redcap/api/", data={"token": "X" * 32, "content": "record", "data": deep})
    assert r.status_code == 400 and "error" in r.json()


def test_json_not_in_utf8_is_a_400_and_stores_nothing(server: LiveServer, admin: httpx.Client,
                                                      world: dict[str, Any]) -> None:
    # Python's JSON parser reads UTF-16 and UTF-32 on its own, so a NUL escape in such a body went
    # past the check for one and reached PostgreSQL as a 500
    before = admin.get("/api/v1/studies").json()
    body = '{"key": "utf16", "name": "a\\u0000b", "timezone": "UTC", "template": "pal-replication"}'
    for encoding in ("utf-16-le", "utf-16", "utf-32"):
        r = admin.post("/api/v1/studies", content=body.encode(encoding), headers={"content-type": "application/json"})
        assert r.status_code == 400, (encoding, r.status_code, r.text[:200])
        assert r.json()["errors"][0]["code"] == "encoding" and "UTF-8" in r.json()["detail"]
    key = world["a"]["key"]
    r = admin.post(f"/api/v1/studies/{key}/responses", content='{"external_id": "x"}'.encode("utf-16"),
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert admin.get("/api/v1/studies").json() == before


# -- exports opened in spreadsheets ----------------------------------------------------------------


def test_formula_cells_are_inert_in_csv_exports_unless_asked_raw(server: LiveServer, admin: httpx.Client) -> None:
    codebook = minimal_codebook()
    codebook["instruments"][0]["items"].append({"code": "note", "type": "text", "label": "Anything else?",
                                                "required": False, "waves": ["intake"]})
    key = f"formula-{uuid.uuid4().hex[:6]}"
    r = admin.post("/api/v1/studies", json={"key": key, "name": "Formulas", "timezone": "UTC", "codebook": codebook})
    assert r.status_code == 201, r.text
    hostile = ["=HYPERLINK(\"http://evil\",\"x\")", "+1+1", "-2+3", "@SUM(A1)", "\tTAB", "\rCR", "plain", "a=b"]
    for i, text in enumerate(hostile):
        pid = f"F{i}"
        admin.post(f"/api/v1/studies/{key}/participants", json={
            "external_id": pid, "enrolled_at": datetime.now(UTC).isoformat()})
        answers = valid_answers("intake", random.Random(i), codebook)
        r = admin.post(f"/api/v1/studies/{key}/responses", json={
            "external_id": pid, "wave": "intake", "status": "complete", "answers": {**answers, "note": text}})
        assert r.status_code == 201, r.text
    analyst = admin.post("/api/v1/tokens", json={"role": "analyst", "label": "csv"}).json()["token"]

    def notes(raw: bool) -> set[str]:
        r = httpx.get(f"{server.url}/api/v1/studies/{key}/export", headers=auth(analyst),
                      params={"format": "csv", "raw_cells": str(raw).lower()})
        assert r.status_code == 200
        return {row["note"] for row in csv.DictReader(io.StringIO(r.text, newline=""))}

    inert = notes(False)
    assert not {n for n in inert if n[:1] in ("=", "+", "-", "@", "\t", "\r")}
    assert {"'" + h for h in hostile if h[:1] in "=+-@\t\r"} | {"plain", "a=b"} == inert
    assert notes(True) == set(hostile)
    dictionary = httpx.get(f"{server.url}/api/v1/studies/{key}/export/dictionary", headers=auth(analyst))
    assert dictionary.status_code == 200


# -- limits, sessions, headers, connections --------------------------------------------------------


def test_the_rate_limit_counts_a_token_however_the_header_spells_it(template_db: URL, tmp_path: Path) -> None:
    db_url = clone_database(template_db)
    try:
        settings = make_settings(db_url, tmp_path, rate_limit_per_minute=8)
        with serve_app(settings, db_url) as live:
            assert httpx.post(f"{live.url}/api/v1/studies", headers=auth(ADMIN_TOKEN), json={
                "key": "rl", "name": "RL", "timezone": "UTC", "template": "pal-replication"}).status_code == 201
            redcap = httpx.post(f"{live.url}/api/v1/tokens", headers=auth(ADMIN_TOKEN), json={
                "role": "coordinator", "label": "rc", "study_key": "rl", "format": "redcap"}).json()["token"]
            spellings = ["Bearer {}", "bearer {}", "BEARER {}", "Bearer   {}", "bEaReR {}"]
            statuses = []
            for i in range(10):
                header = spellings[i % len(spellings)].format(ADMIN_TOKEN)
                r = httpx.post(f"{live.url}/api/v1/tokens", headers={"Authorization": header},
                               json={"role": "analyst", "label": f"t{i}"})
                statuses.append(r.status_code)
            assert statuses[:6] == [201] * 6  # 2 writes before, 6 here: the allowance of 8
            assert statuses[6:] == [429] * 4
            assert "retry-after" in r.headers
            # REDCap posts count against their own token, however the token field is padded
            answers = [httpx.post(f"{live.url}/redcap/api/", data={"token": f" {redcap} " if i % 2 else redcap,
                                                                   "content": "version"}).status_code
                       for i in range(10)]
            assert answers[:8] == [200] * 8 and answers[8:] == [429] * 2
    finally:
        drop_database(db_url)


def test_signing_out_ends_the_session_on_the_server(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, follow_redirects=False, timeout=30) as browser:
        assert browser.post("/ui/login", data={"token": ADMIN_TOKEN}).status_code == 303
        cookie = browser.cookies.get("cohort_session")
        assert cookie is not None
        home = browser.get("/ui/")
        assert home.status_code == 200
        csrf = home.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        assert browser.post("/ui/logout", data={"csrf": csrf}).status_code == 303
    # a copy of the old cookie, with its CSRF value, no longer works
    with httpx.Client(base_url=server.url, follow_redirects=False, timeout=30,
                      cookies={"cohort_session": cookie}) as old:
        r = old.get("/ui/")
        assert r.status_code in (303, 307) and "/ui/login" in r.headers["location"]
        r = old.post("/ui/logout", data={"csrf": csrf})
        assert r.status_code in (303, 307, 401, 403) and "/ui/login" in r.headers.get("location", "/ui/login")


def test_pages_send_security_headers(server: LiveServer) -> None:
    for path in ("/ui/login", "/ui/"):
        r = httpx.get(server.url + path, follow_redirects=False)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src", 1)[1].split(";")[0]
        assert "frame-ancestors 'none'" in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"


def test_secrets_in_urls_are_redacted_from_access_logs() -> None:
    import logging

    from app.core.logs import RedactSecrets

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/s/SECRETLINK?token=abc&x=1&access_token=def", "1.1", 200),
                               None)
    RedactSecrets().filter(record)
    line = record.getMessage()
    assert "SECRETLINK" not in line and "abc" not in line and "def" not in line
    assert "x=1" in line


def test_after_a_server_error_the_connection_stays_usable(template_db: URL, tmp_path: Path) -> None:
    from app.main import create_app

    db_url = clone_database(template_db)
    try:
        settings = make_settings(db_url, tmp_path)
        app = create_app(settings)

        @app.get("/boom")
        def boom() -> None:
            raise RuntimeError("a bug, not the client's fault")

        import uvicorn

        from tests.conftest import free_port

        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            threading.Event().wait(0.05)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/boom")
            first = conn.getresponse()
            body = json.loads(first.read())
            assert first.status == 500 and body["status"] == 500
            assert first.getheader("content-type", "").startswith("application/problem+json")
            conn.request("GET", "/healthz")  # the same socket
            second = conn.getresponse()
            assert second.status == 200
            second.read()
            conn.close()
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    finally:
        drop_database(db_url)


def test_the_reminder_scan_runs_during_a_burst_of_writes_without_error(server: LiveServer,
                                                                       admin: httpx.Client) -> None:
    """Windows opening now (the scan plans and claims their sends) while their responses arrive."""
    key = f"burst-{uuid.uuid4().hex[:6]}"
    assert admin.post("/api/v1/studies", json={"key": key, "name": "Burst", "timezone": "UTC",
                                               "template": "pal-replication"}).status_code == 201
    n = 120
    now = datetime.now(UTC)
    rows = [{"external_id": f"B{i}", "enrolled_at": (now - timedelta(hours=1)).isoformat(),
             "contact": {"email": f"b{i}@example.org"}} for i in range(n)]
    r = admin.post(f"/api/v1/studies/{key}/participants:import", json=rows)
    assert r.status_code == 200 and r.json()["created"] == n, r.text
    errors: list[str] = []
    clock = (now.replace(hour=12, minute=0, second=0, microsecond=0) + timedelta(days=1)).isoformat()

    def writer(ids: list[int]) -> None:
        with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN), timeout=60) as client:
            for i in ids:
                r = client.post(f"/api/v1/studies/{key}/responses", json={
                    "external_id": f"B{i}", "wave": "baseline", "status": "complete",
                    "answers": valid_answers("baseline", random.Random(i))})
                if r.status_code != 201:
                    errors.append(f"write B{i}: {r.status_code} {r.text[:200]}")

    def scanner() -> None:
        with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN), timeout=120) as client:
            for _ in range(6):
                r = client.post(f"/api/v1/studies/{key}/reminders:run", params={"now": clock})
                if r.status_code != 200:
                    errors.append(f"scan: {r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=writer, args=(list(range(k, n, 6)),)) for k in range(6)]
    threads.append(threading.Thread(target=scanner))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, "\n".join(errors[:10])
    listed = admin.get(f"/api/v1/studies/{key}/responses", params={"limit": 500}).json()["items"]
    assert len(listed) == n


def test_no_route_answers_500_to_any_of_these(server: LiveServer, world: dict[str, Any]) -> None:
    """A few shapes that once answered 500, replayed against every surface."""
    a = world["a"]
    hostile = [
        ("POST", f"/api/v1/studies/{a['key']}/participants/P1/withdraw",
         {"reason": "x", "erase_contact": False, "withdrawn_at": "0001-01-01T00:00:00+14:00"}),
        ("PUT", f"/api/v1/studies/{a['key']}/reminder-template",
         {"subject": "x", "body": "{% for i in range(100000000) %}x{% endfor %}"}),
        ("PUT", f"/api/v1/studies/{a['key']}/reminder-template", {"subject": "{{ 'x' * 1000000000 }}", "body": "x"}),
        ("POST", "/api/v1/studies", {"key": "crlf-" + uuid.uuid4().hex[:6], "name": "x", "timezone": "UTC",
                                     "codebook": {**minimal_codebook(), "waves": [
                                         {**minimal_codebook()["waves"][0], "label": "Intake\r\nBcc: x@evil"},
                                         minimal_codebook()["waves"][1]]}}),
    ]
    for method, path, body in hostile:
        r = httpx.request(method, server.url + path, json=body, headers=auth(ADMIN_TOKEN), timeout=60)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
        assert r.json()["errors"], r.text
