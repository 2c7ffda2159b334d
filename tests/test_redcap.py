"""The REDCap-compatible API, driven by the real PyCap client against the running service."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import URL

from tests.conftest import ADMIN_TOKEN, LiveServer, make_settings, serve_app
from tests.factories import auth, items_at, pal_codebook, valid_answers

redcap = pytest.importorskip("redcap", reason="PyCap is in the dev extras")

BASE = "/api/v1/studies/pal"


@pytest.fixture
def server(fresh_db: URL, tmp_path: Path) -> Iterator[LiveServer]:
    with serve_app(make_settings(fresh_db, tmp_path, rate_limit_per_minute=0), fresh_db) as live:
        yield live


def flat(record: str, wave: str, answers: dict[str, Any], complete: bool) -> dict[str, str]:
    """A REDCap flat row written the way REDCap users write them (independent of the service's code)."""
    row = {"record_id": record, "redcap_event_name": f"{wave}_arm_1"}
    codebook = pal_codebook()
    for instrument in codebook["instruments"]:
        if wave not in instrument["waves"] and not any(wave in i["waves"] for i in instrument["items"]):
            continue
        for item in instrument["items"]:
            value = answers.get(item["code"])
            if item["type"] == "multi_choice":
                for option in item["options"]:
                    row[f"{item['code']}___{option['code']}"] = "" if value is None else (
                        "1" if option["code"] in value else "0")
            elif isinstance(value, bool):
                row[item["code"]] = "1" if value else "0"
            else:
                row[item["code"]] = "" if value is None else str(value)
        row[f"{instrument['key']}_complete"] = "2" if complete else "1"
    return row


def setup(server: LiveServer, people: int = 3) -> dict[str, dict[str, Any]]:
    """A PAL study; P1 and P2 answered the baseline through the native API."""
    enrolled = datetime.now(UTC) - timedelta(days=10)
    answers: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        assert admin.post("/api/v1/studies", json={"key": "pal", "name": "PAL replication", "timezone": "UTC",
                                                   "template": "pal-replication"}).status_code == 201
        for i in range(1, people + 1):
            r = admin.post(f"{BASE}/participants", json={"external_id": f"P{i}", "enrolled_at": enrolled.isoformat(),
                                                          "contact": {"email": f"p{i}@example.org"}})
            assert r.status_code == 201, r.text
        for i in (1, 2):
            answers[f"P{i}"] = valid_answers("baseline", random.Random(i), groups_30d=["aa_12step", "smart"])
            r = admin.post(f"{BASE}/responses", json={"external_id": f"P{i}", "wave": "baseline",
                                                      "answers": answers[f"P{i}"]})
            assert r.status_code == 201, r.text
    return answers


def redcap_token(server: LiveServer, role: str) -> str:
    r = httpx.post(f"{server.url}/api/v1/tokens", headers=auth(ADMIN_TOKEN),
                   json={"role": role, "label": f"redcap {role}", "study_key": "pal", "format": "redcap"})
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    assert len(token) == 32
    return token


def test_pycap_reads_the_study_as_a_longitudinal_project(server: LiveServer) -> None:
    answers = setup(server)
    project = redcap.Project(f"{server.url}/redcap/api/", redcap_token(server, "coordinator"))
    codebook = pal_codebook()

    assert str(project.export_version()).startswith("14.")
    assert project.export_project_info()["is_longitudinal"] == 1
    assert project.is_longitudinal and project.def_field == "record_id"
    metadata = project.export_metadata()
    codes = [i["code"] for inst in codebook["instruments"] for i in inst["items"]]
    assert [m["field_name"] for m in metadata] == ["record_id", *codes]
    by_name = {m["field_name"]: m for m in metadata}
    groups = next(i for inst in codebook["instruments"] for i in inst["items"] if i["code"] == "groups_30d")
    assert by_name["groups_30d"]["field_type"] == "checkbox"
    assert by_name["groups_30d"]["select_choices_or_calculations"] == " | ".join(
        f"{o['code']}, {o['label']}" for o in groups["options"])
    assert by_name["age"]["text_validation_type_or_show_slider_number"] == "integer"
    assert by_name["hispanic"]["field_type"] == "yesno"
    assert [e["unique_event_name"] for e in project.export_events()] == [
        "baseline_arm_1", "month6_arm_1", "month12_arm_1"]
    mapping = {(m["unique_event_name"], m["form"]) for m in project.export_instrument_event_mappings()}
    for inst in codebook["instruments"]:
        for wave in inst["waves"]:
            assert (f"{wave}_arm_1", inst["key"]) in mapping
    names = project.export_field_names()
    assert {n["export_field_name"] for n in names if n["original_field_name"] == "groups_30d"} == {
        f"groups_30d___{o['code']}" for o in groups["options"]}

    records = project.export_records()
    assert {(r["record_id"], r["redcap_event_name"]) for r in records} == {
        ("P1", "baseline_arm_1"), ("P2", "baseline_arm_1")}
    for record in records:
        expected = flat(record["record_id"], "baseline", answers[record["record_id"]], True)
        assert {k: record[k] for k in expected} == expected
    frame = project.export_records(format_type="df")
    assert int(frame.loc[("P1", "baseline_arm_1"), "age"]) == answers["P1"]["age"]
    assert frame.loc[("P2", "baseline_arm_1"), "demographics_complete"] == 2

    some = project.export_records(records=["P2"], fields=["age"], events=["baseline_arm_1"])
    assert some == [{"record_id": "P2", "redcap_event_name": "baseline_arm_1", "age": str(answers["P2"]["age"]),
                     "demographics_complete": "2"}]
    eav = project.export_records(record_type="eav", records=["P1"], fields=["age"])
    assert {"record": "P1", "redcap_event_name": "baseline_arm_1", "field_name": "age",
            "value": str(answers["P1"]["age"])} in eav
    labelled = project.export_records(records=["P1"], fields=["hispanic"], raw_or_label="label")
    assert labelled[0]["hispanic"] == ("Yes" if answers["P1"]["hispanic"] else "No")


def test_pycap_imports_records_through_the_native_validation_all_or_nothing(server: LiveServer) -> None:
    setup(server, people=5)
    token = redcap_token(server, "collector")
    project = redcap.Project(f"{server.url}/redcap/api/", token)
    good = valid_answers("baseline", random.Random(3))

    # one bad value spoils the whole import: nothing of it is stored
    bad_row = flat("P4", "baseline", valid_answers("baseline", random.Random(4)), True) | {"age": "forty"}
    with pytest.raises(redcap.RedcapError) as refused:
        project.import_records([flat("P3", "baseline", good, True), bad_row])
    assert "P4" in str(refused.value) and "age" in str(refused.value)
    out_of_range = flat("P4", "baseline", valid_answers("baseline", random.Random(4)), True) | {"age": "7"}
    with pytest.raises(redcap.RedcapError) as ranged:
        project.import_records([out_of_range])
    assert "range" in str(ranged.value)
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        assert admin.get(f"{BASE}/responses", params={"external_id": "P3"}).json()["items"] == []

        assert project.import_records([flat("P3", "baseline", good, True)]) == {"count": 1}
        stored = admin.get(f"{BASE}/responses", params={"external_id": "P3", "wave": "baseline"}).json()["items"]
        assert len(stored) == 1 and stored[0]["status"] == "complete"
        assert stored[0]["answers"] == good  # typed exactly as the native API would store them
        # the same import again is a no-op; a different one is refused like a native POST after complete
        assert project.import_records([flat("P3", "baseline", good, True)]) == {"count": 1}
        changed = flat("P3", "baseline", good, True) | {"age": str(good["age"] + 1 if good["age"] < 99 else 98)}
        with pytest.raises(redcap.RedcapError, match="complete"):
            project.import_records([changed])
        # a pandas DataFrame import (PyCap sends it as CSV), returning ids
        import pandas as pd

        frame = pd.DataFrame([flat("P5", "baseline", valid_answers("baseline", random.Random(5)), False)])
        assert project.import_records(frame, import_format="df", return_content="ids") == ["P5"]
        partial = admin.get(f"{BASE}/responses", params={"external_id": "P5"}).json()["items"]
        assert partial[0]["status"] == "partial"
        # audited under the REDCap token, like any write
        token_id = admin.get("/api/v1/tokens").json()["items"][-1]["id"]
        audit = admin.get(f"{BASE}/audit", params={"table": "responses", "actor": token_id}).json()["items"]
        assert {e["after"]["participant_id"] for e in audit if e["action"] == "INSERT"} and len(audit) >= 2


def test_errors_and_roles_as_redcap_clients_expect_them(server: LiveServer) -> None:
    setup(server)
    url = f"{server.url}/redcap/api/"
    wrong = httpx.post(url, data={"token": "0" * 32, "content": "version", "format": "json"})
    assert wrong.status_code == 403 and "error" in wrong.json()
    as_csv = httpx.post(url, data={"token": "0" * 32, "content": "record", "format": "csv"})
    assert as_csv.status_code == 403 and as_csv.text.startswith("error:")
    collector = redcap_token(server, "collector")
    export = httpx.post(url, data={"token": collector, "content": "record", "format": "json"})
    assert export.status_code == 403 and "collector" in export.json()["error"]
    unknown = httpx.post(url, data={"token": collector, "content": "record", "format": "json", "fields[0]": "nope"})
    assert unknown.status_code == 403  # roles are checked before anything else
    analyst = redcap.Project(url, redcap_token(server, "analyst"))
    ids = {r["record_id"] for r in analyst.export_records()}
    assert len(ids) == 2 and not ids & {"P1", "P2"}  # analysts see pseudonyms, never external ids
    coordinator = redcap_token(server, "coordinator")
    bad_field = httpx.post(url, data={"token": coordinator, "content": "record", "format": "json",
                                      "fields[0]": "nope"})
    assert bad_field.status_code == 400 and "nope" in bad_field.json()["error"]
    link = httpx.post(url, data={"token": coordinator, "content": "surveyLink", "format": "json", "record": "P1",
                                 "instrument": "demographics", "event": "baseline_arm_1"})
    assert link.status_code == 200 and "/s/" in link.text
    resolved = httpx.get(link.text.replace("http://127.0.0.1:8000", server.url))
    # P1's baseline is complete: the link has done its work (contract 6, v1.1); a month6 one still resolves
    assert resolved.status_code == 410 and "received" in resolved.json()["detail"]
    link = httpx.post(url, data={"token": coordinator, "content": "surveyLink", "format": "json", "record": "P1",
                                 "instrument": "mutual_help", "event": "month6_arm_1"})
    resolved = httpx.get(link.text.replace("http://127.0.0.1:8000", server.url))
    assert resolved.status_code == 200 and resolved.json()["external_id"] == "P1"
    auto = httpx.post(url, data={"token": coordinator, "content": "record", "format": "json", "data": "[]",
                                 "forceAutoNumber": "TRUE"})
    assert auto.status_code == 400 and "forceAutoNumber" in auto.json()["error"]
    log = httpx.post(url, data={"token": coordinator, "content": "log", "format": "json"}).json()
    assert any(e["action"].startswith("Created Record P1, event baseline_arm_1, forms demographics") for e in log)
    assert all(i["code"] in {m["field_name"] for m in redcap.Project(url, coordinator).export_metadata()}
               for i in items_at(pal_codebook(), "baseline"))


def test_a_redcap_token_belongs_to_one_study(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/api/v1/tokens", headers=auth(ADMIN_TOKEN),
                   json={"role": "coordinator", "label": "no project", "format": "redcap"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["study_key"]


@pytest.mark.parametrize(("fields", "needle"), [
    ({"content": "record", "format": "xml", "returnFormat": "json"}, "format"),
    ({"content": "record", "format": "json", "data": "not json"}, "parsed"),
    ({"content": "record", "format": "json", "data": '[{"age": "40"}]'}, "record_id"),
    ({"content": "record", "format": "json", "data": '[{"record_id": "P1", "redcap_event_name": "x"}]'}, "event"),
    ({"content": "record", "format": "json", "type": "wide"}, "type"),
    ({"content": "record", "format": "json", "events[0]": "month99_arm_1"}, "events"),
    ({"content": "nonsense", "format": "json"}, "not supported"),
    ({"content": "surveyLink", "format": "json", "record": "P1", "instrument": "nope",
      "event": "baseline_arm_1"}, "instrument"),
])
def test_bad_requests_are_400_with_a_redcap_error_and_change_nothing(server: LiveServer, fields: dict[str, str],
                                                                     needle: str) -> None:
    setup(server)
    before = httpx.get(f"{server.url}{BASE}/audit", headers=auth(ADMIN_TOKEN)).json()["items"][0]["id"]
    r = httpx.post(f"{server.url}/redcap/api/", data={"token": redcap_token(server, "coordinator"), **fields})
    assert r.status_code == 400 and needle in r.json()["error"], r.text
    latest = httpx.get(f"{server.url}{BASE}/audit", headers=auth(ADMIN_TOKEN)).json()["items"]
    assert [e for e in latest if e["id"] > before and e["table"] != "api_tokens"] == []
