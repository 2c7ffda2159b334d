"""REDCap fidelity (issue 17): filter logic, date ranges, labels, CSV safety, refused writes and unsupported
contents, each through the real PyCap client. Expected rows are built here from the answers the test wrote,
independently of the service's code."""

from __future__ import annotations

import csv
import io
import random
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import URL

from tests.conftest import ADMIN_TOKEN, LiveServer, make_settings, serve_app
from tests.factories import auth, pal_codebook, valid_answers

redcap = pytest.importorskip("redcap", reason="PyCap is in the dev extras")

BASE = "/api/v1/studies/pal"
# (external_id, gender, age, groups_30d at baseline, month6 groups or None when no month6 response)
PEOPLE: list[tuple[str, str, int, list[str], list[str] | None]] = [
    ("R1", "woman", 62, ["smart"], ["smart", "wfs"]),
    ("R2", "woman", 45, ["aa_12step"], None),
    ("R3", "man", 71, ["smart", "lifering"], []),
    ("R4", "man", 29, [], None),
    ("R5", "another", 55, ["wfs"], ["aa_12step"]),
    ("R6", "woman", 51, ["smart"], None),
    ("R7", "woman", 30, ["lifering"], ["smart"]),
]
PARTIAL = "R8"  # a started baseline: demographics only, without income


@pytest.fixture
def server(fresh_db: URL, tmp_path: Path) -> Iterator[LiveServer]:
    with serve_app(make_settings(fresh_db, tmp_path, rate_limit_per_minute=0), fresh_db) as live:
        yield live


def token_for(server: LiveServer, role: str = "coordinator") -> str:
    r = httpx.post(f"{server.url}/api/v1/tokens", headers=auth(ADMIN_TOKEN),
                   json={"role": role, "label": f"redcap {role}", "study_key": "pal", "format": "redcap"})
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


def known_data(server: LiveServer) -> dict[tuple[str, str], dict[str, Any]]:
    """Writes the PEOPLE through the native API; returns (record, event) -> answers as written."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    enrolled = datetime.now(UTC) - timedelta(days=200)
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        assert admin.post("/api/v1/studies", json={"key": "pal", "name": "PAL", "timezone": "UTC",
                                                   "template": "pal-replication"}).status_code == 201
        for n, (ext, gender, age, groups, later) in enumerate(PEOPLE):
            assert admin.post(f"{BASE}/participants", json={"external_id": ext, "enrolled_at": enrolled.isoformat()}
                              ).status_code == 201
            answers = valid_answers("baseline", random.Random(n), gender=gender, age=age, groups_30d=groups)
            r = admin.post(f"{BASE}/responses", json={"external_id": ext, "wave": "baseline", "answers": answers})
            assert r.status_code == 201, r.text
            rows[(ext, "baseline_arm_1")] = answers
            if later is not None:
                answers = valid_answers("month6", random.Random(100 + n), groups_30d=later)
                r = admin.post(f"{BASE}/responses", json={"external_id": ext, "wave": "month6", "answers": answers})
                assert r.status_code == 201, r.text
                rows[(ext, "month6_arm_1")] = answers
        assert admin.post(f"{BASE}/participants", json={"external_id": PARTIAL, "enrolled_at": enrolled.isoformat()}
                          ).status_code == 201
        partial = {"gender": "man", "age": 40}
        r = admin.post(f"{BASE}/responses", json={"external_id": PARTIAL, "wave": "baseline", "status": "partial",
                                                  "answers": partial})
        assert r.status_code == 201, r.text
        rows[(PARTIAL, "baseline_arm_1")] = partial
    return rows


def complete(record: str, event: str) -> bool:
    return record != PARTIAL


Check = Callable[[str, str, dict[str, Any], dict[tuple[str, str], dict[str, Any]]], bool]

# Each filter in REDCap's syntax, with the rule written independently in Python over the stored answers.
# A field without an event refers to the row's own event, where a field not asked is blank.
FILTERS: list[tuple[str, Check]] = [
    ("[age] > 50", lambda r, e, a, _: a.get("age", -1) > 50),
    ("[age] > 50 and [gender] = 'woman'", lambda r, e, a, _: a.get("age", -1) > 50 and a.get("gender") == "woman"),
    ("[gender] = 'woman'", lambda r, e, a, _: a.get("gender") == "woman"),
    ('[gender] <> "man" or ([age] <= 30)',
     lambda r, e, a, _: a.get("gender") != "man" or ("age" in a and a["age"] <= 30)),
    ("[age] >= 45 and [age] < 62", lambda r, e, a, _: 45 <= a.get("age", -1) < 62),
    ("not ([age] >= 40)", lambda r, e, a, _: not ("age" in a and a["age"] >= 40)),
    ("[baseline_arm_1][gender] = 'woman'", lambda r, e, a, rows: rows[(r, "baseline_arm_1")].get("gender") == "woman"),
    ("[groups_30d(smart)] = '1'", lambda r, e, a, _: "smart" in (a.get("groups_30d") or [])),
    ("[groups_30d(smart)] = '1' and [groups_30d(wfs)] = '1'",
     lambda r, e, a, _: {"smart", "wfs"} <= set(a.get("groups_30d") or [])),
    ("[month6_arm_1][groups_30d(aa_12step)] = '1'",
     lambda r, e, a, rows: "aa_12step" in (rows.get((r, "month6_arm_1"), {}).get("groups_30d") or [])),
    ("[income] = ''", lambda r, e, a, _: "income" not in a),
    ("[income] <> '' and [age] < 50", lambda r, e, a, _: "income" in a and a["age"] < 50),
    ("[demographics_complete] = '2'", lambda r, e, a, _: e == "baseline_arm_1" and complete(r, e)),
    ("[demographics_complete] = '1'", lambda r, e, a, _: e == "baseline_arm_1" and not complete(r, e)),
    ("sum([meetings_30d], [online_meetings_30d]) >= 10",
     lambda r, e, a, _: "meetings_30d" in a and a["meetings_30d"] + a["online_meetings_30d"] >= 10),
    ("if([gender] = 'woman', [age], 0) > 40", lambda r, e, a, _: a.get("gender") == "woman" and a["age"] > 40),
    ("datediff('2024-01-01', '2024-03-01', 'd') = 60 and [age] < 35", lambda r, e, a, _: a.get("age", 99) < 35),
    ("'2026-01-15' > '2025-12-31' && ([age] > 70 || [age] < 30)",
     lambda r, e, a, _: "age" in a and (a["age"] > 70 or a["age"] < 30)),
    ("[record_id] = 'R3'", lambda r, e, a, _: r == "R3"),
]


def test_filter_logic_returns_exactly_the_matching_rows(server: LiveServer) -> None:
    rows = known_data(server)
    project = redcap.Project(f"{server.url}/redcap/api/", token_for(server))
    for logic, check in FILTERS:
        expected = {(r, e) for (r, e), a in rows.items() if check(r, e, a, rows)}
        got = project.export_records(filter_logic=logic, fields=["record_id", "age"])
        assert {(x["record_id"], x["redcap_event_name"]) for x in got} == expected, logic
        assert expected, f"{logic}: the data should make this filter select something"
        assert expected != set(rows), f"{logic}: the data should make this filter leave something out"
    # the example, as a REDCap user writes it, with a DataFrame
    frame = project.export_records(format_type="df", filter_logic="[age] > 50 and [gender] = 'woman'")
    assert sorted({i[0] for i in frame.index}) == ["R1", "R6"]
    # events= still narrows the rows a filter selects
    only = project.export_records(filter_logic="[baseline_arm_1][gender] = 'woman'", events=["month6_arm_1"])
    assert {(x["record_id"], x["redcap_event_name"]) for x in only} == {("R1", "month6_arm_1"), ("R7", "month6_arm_1")}


@pytest.mark.parametrize(("logic", "needle"), [
    ("[age] >> 5", "position"),
    ("[nope] = 1", "[nope]"),
    ("[age] = 'x", "unterminated"),
    ("eval('1')", "eval"),
    ("__import__('os')", "__import__"),
    ("[groups_30d] = '1'", "checkbox"),
    ("[groups_30d(zzz)] = '1'", "zzz"),
    ("[age(1)] = '1'", "not a checkbox"),
    ("[month99_arm_1][age] = 1", "month99_arm_1"),
    ("([age] > 1", "')'"),
    ("[age] > 1 [gender]", "unexpected"),
    ("datediff('2020-01-01', 'today', 'weeks') > 1", "unit"),
    ("sum()", "arguments"),
    ("1 < [age] < 3", "chained"),
    ("(" * 100 + "1" + ")" * 100, "deeper"),
])
def test_filter_logic_it_cannot_read_is_a_400_naming_the_problem(server: LiveServer, logic: str,
                                                                  needle: str) -> None:
    known_data(server)
    project = redcap.Project(f"{server.url}/redcap/api/", token_for(server))
    with pytest.raises(redcap.RedcapError) as refused:
        project.export_records(filter_logic=logic)
    assert "filterLogic" in str(refused.value) and needle in str(refused.value)
    raw = httpx.post(f"{server.url}/redcap/api/", data={"token": token_for(server), "content": "record",
                                                         "format": "json", "filterLogic": logic})
    assert raw.status_code == 400 and needle in raw.json()["error"]


def test_date_range_filters_on_each_records_last_change(server: LiveServer) -> None:
    rows = known_data(server)
    project = redcap.Project(f"{server.url}/redcap/api/", token_for(server))
    everyone = {r for r, _ in rows}
    now = datetime.now(UTC).replace(tzinfo=None)
    assert {x["record_id"] for x in project.export_records(date_begin=now - timedelta(hours=1))} == everyone
    assert project.export_records(date_begin=now + timedelta(days=365 * 70)) == []  # the 2099 begin
    assert project.export_records(date_end=now - timedelta(hours=1)) == []
    time.sleep(1.1)
    cut = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    time.sleep(1.1)
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:  # R4 answers again
        r = admin.post(f"{BASE}/responses", json={"external_id": "R4", "wave": "month6", "status": "partial",
                                                  "answers": {"meetings_30d": 3}})
        assert r.status_code == 201, r.text
    changed = project.export_records(date_begin=cut)
    # the whole record (all its events) is returned when it changed in the range, as REDCap does
    assert {(x["record_id"], x["redcap_event_name"]) for x in changed} == {
        ("R4", "baseline_arm_1"), ("R4", "month6_arm_1")}
    before = project.export_records(date_end=cut)
    assert {x["record_id"] for x in before} == everyone - {"R4"}
    bad = httpx.post(f"{server.url}/redcap/api/", data={"token": token_for(server), "content": "record",
                                                         "format": "json", "dateRangeBegin": "yesterday"})
    assert bad.status_code == 400 and "dateRangeBegin" in bad.json()["error"]


def test_labels_checkbox_labels_headers_survey_fields_and_groups(server: LiveServer) -> None:
    rows = known_data(server)
    project = redcap.Project(f"{server.url}/redcap/api/", token_for(server))
    groups = next(i for inst in pal_codebook()["instruments"] for i in inst["items"] if i["code"] == "groups_30d")
    label_of = {o["code"]: o["label"] for o in groups["options"]}
    chosen = rows[("R1", "baseline_arm_1")]["groups_30d"]

    labelled = project.export_records(records=["R1"], events=["baseline_arm_1"], fields=["groups_30d", "gender"],
                                      raw_or_label="label")[0]
    for code in label_of:
        assert labelled[f"groups_30d___{code}"] == ("Checked" if code in chosen else "Unchecked")
    assert labelled["gender"] == "Woman" and labelled["demographics_complete"] == "Complete"
    boxes = project.export_records(records=["R1"], events=["baseline_arm_1"], fields=["groups_30d"],
                                   raw_or_label="label", export_checkbox_labels=True)[0]
    for code, label in label_of.items():
        assert boxes[f"groups_30d___{code}"] == (label if code in chosen else "")
    raw = project.export_records(records=["R1"], events=["baseline_arm_1"], fields=["groups_30d"])[0]
    assert {c: raw[f"groups_30d___{c}"] for c in label_of} == {c: "1" if c in chosen else "0" for c in label_of}

    headed = project.export_records(format_type="csv", records=["R1"], fields=["age", "groups_30d"],
                                    raw_or_label_headers="label")
    header = next(csv.reader(io.StringIO(headed)))
    assert header[:3] == ["Record ID", "Event Name", "Age in years"]
    assert f"{groups['label']} (choice={label_of['smart']})" in header

    survey = project.export_records(records=["R1", PARTIAL], fields=["age"], export_survey_fields=True,
                                    export_data_access_groups=True)
    by_key = {(x["record_id"], x["redcap_event_name"]): x for x in survey}
    first = by_key[("R1", "baseline_arm_1")]
    assert list(first)[:4] == ["record_id", "redcap_event_name", "redcap_data_access_group",
                               "redcap_survey_identifier"]
    assert first["redcap_data_access_group"] == "" and first["redcap_survey_identifier"] == ""
    assert datetime.strptime(first["demographics_timestamp"], "%Y-%m-%d %H:%M:%S")
    assert by_key[(PARTIAL, "baseline_arm_1")]["demographics_timestamp"] == ""  # not complete: no timestamp


def test_a_started_event_shows_untouched_forms_as_incomplete(server: LiveServer) -> None:
    known_data(server)
    project = redcap.Project(f"{server.url}/redcap/api/", token_for(server))
    row = project.export_records(records=[PARTIAL])[0]
    assert row["demographics_complete"] == "1"  # started
    assert row["aud_criteria_complete"] == row["mutual_help_complete"] == "0"  # never opened
    labelled = project.export_records(records=[PARTIAL], raw_or_label="label")[0]
    assert labelled["aud_criteria_complete"] == "Incomplete" and labelled["demographics_complete"] == "Unverified"


def test_unknown_forms_are_an_error(server: LiveServer) -> None:
    known_data(server)
    project = redcap.Project(f"{server.url}/redcap/api/", token_for(server))
    with pytest.raises(redcap.RedcapError, match="nope"):
        project.export_records(forms=["demographics", "nope"])
    assert {k for k in project.export_records(forms=["demographics"])[0]} >= {"gender", "demographics_complete"}


def native_response(server: LiveServer, ext: str, wave: str) -> dict[str, Any]:
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        items = admin.get(f"{BASE}/responses", params={"external_id": ext, "wave": wave}).json()["items"]
    assert len(items) == 1
    found: dict[str, Any] = items[0]
    return found


def form_row(record: str, form: str, answers: dict[str, Any], status: str) -> dict[str, str]:
    """One form of a baseline row as a REDCap user writes it."""
    instrument = next(i for i in pal_codebook()["instruments"] if i["key"] == form)
    row = {"record_id": record, "redcap_event_name": "baseline_arm_1", f"{form}_complete": status}
    for item in instrument["items"]:
        value = answers.get(item["code"])
        if value is None:
            continue
        if item["type"] == "multi_choice":
            row.update({f"{item['code']}___{o['code']}": "1" if o["code"] in value else "0" for o in item["options"]})
        elif isinstance(value, bool):
            row[item["code"]] = "1" if value else "0"
        else:
            row[item["code"]] = str(value)
    return row


def test_forms_complete_one_at_a_time(server: LiveServer) -> None:
    known_data(server)
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        admin.post(f"{BASE}/participants", json={"external_id": "F1", "enrolled_at": datetime.now(UTC).isoformat()})
    project = redcap.Project(f"{server.url}/redcap/api/", token_for(server, "collector"))
    reader = redcap.Project(f"{server.url}/redcap/api/", token_for(server))
    answers = valid_answers("baseline", random.Random(42))
    forms = [i["key"] for i in pal_codebook()["instruments"] if "baseline" in i["waves"]]

    assert project.import_records([form_row("F1", "demographics", answers, "2")]) == {"count": 1}
    stored = native_response(server, "F1", "baseline")
    assert stored["status"] == "partial" and stored["instruments"]["demographics"] == "complete"
    assert all(stored["instruments"][f] == "not_started" for f in forms[1:])
    row = reader.export_records(records=["F1"])[0]
    assert row["demographics_complete"] == "2" and all(row[f"{f}_complete"] == "0" for f in forms[1:])

    assert project.import_records([form_row("F1", "substance_use", answers, "1")]) == {"count": 1}
    row = reader.export_records(records=["F1"])[0]
    assert row["substance_use_complete"] == "1" and row["demographics_complete"] == "2"
    assert native_response(server, "F1", "baseline")["instruments"]["substance_use"] == "partial"

    # a complete form is not reopened by an import
    with pytest.raises(redcap.RedcapError, match="demographics_complete"):
        project.import_records([form_row("F1", "demographics", answers, "1")])
    for form in forms[1:]:
        project.import_records([form_row("F1", form, answers, "2")])
    stored = native_response(server, "F1", "baseline")
    assert stored["status"] == "complete" and set(stored["instruments"].values()) == {"complete"}
    row = reader.export_records(records=["F1"], export_survey_fields=True)[0]
    assert all(row[f"{f}_complete"] == "2" and row[f"{f}_timestamp"] for f in forms)


@pytest.mark.parametrize("status", ["7", "3", "-1", "yes", "2.0"])
def test_form_status_is_0_1_or_2(server: LiveServer, status: str) -> None:
    known_data(server)
    project = redcap.Project(f"{server.url}/redcap/api/", token_for(server, "collector"))
    row = form_row("R8", "demographics", {"income": "under_20k"}, status)
    with pytest.raises(redcap.RedcapError, match="demographics_complete"):
        project.import_records([row])
    assert native_response(server, "R8", "baseline")["answers"] == {"gender": "man", "age": 40}
    with pytest.raises(redcap.RedcapError, match="nonsense_complete"):
        project.import_records([{"record_id": "R8", "redcap_event_name": "baseline_arm_1", "nonsense_complete": "2"}])


def post(server: LiveServer, token: str, **fields: str) -> httpx.Response:
    return httpx.post(f"{server.url}/redcap/api/", data={"token": token, **fields})


@pytest.mark.parametrize(("call", "needle"), [
    (lambda p: p.import_metadata([{"field_name": "x", "form_name": "f", "field_type": "text", "field_label": "X"}]),
     "design"),
    (lambda p: p.import_arms([{"arm_num": 2, "name": "Arm 2"}]), "design"),
    (lambda p: p.import_events([{"event_name": "x", "arm_num": 1}]), "design"),
    (lambda p: p.import_instrument_event_mappings([{"arm_num": 1, "unique_event_name": "baseline_arm_1",
                                                     "form": "demographics"}]), "design"),
    (lambda p: p.delete_arms(["1"]), "design"),
    (lambda p: p.delete_events(["baseline_arm_1"]), "design"),
    (lambda p: p.delete_records(["R1"]), "withdraw"),
    (lambda p: p.import_repeating_instruments_events([{"form_name": "demographics"}]), "repeating"),
    (lambda p: p.import_dags([{"data_access_group_name": "x"}]), "data access groups"),
    (lambda p: p.switch_dag("x"), "data access groups"),
    (lambda p: p.import_users([{"username": "x"}]), "tokens"),
    (lambda p: p.import_user_roles([{"role_label": "x"}]), "tokens"),
])
def test_writes_that_change_nothing_are_refused(server: LiveServer, call: Callable[[Any], Any],
                                                needle: str) -> None:
    known_data(server)
    project = redcap.Project(f"{server.url}/redcap/api/", token_for(server))
    before = len(project.export_records())
    with pytest.raises(redcap.RedcapError) as refused:
        call(project)
    assert needle in str(refused.value)
    assert len(project.export_records()) == before
    assert [m["field_name"] for m in project.export_metadata()][:2] == ["record_id", "gender"]


@pytest.mark.parametrize(("call", "needle"), [
    (lambda p: p.export_users(), "tokens"),
    (lambda p: p.export_user_roles(), "tokens"),
    (lambda p: p.export_user_role_assignment(), "tokens"),
    (lambda p: p.export_report("1"), "reports"),
    (lambda p: p.generate_next_record_name(), "auto-numbering"),
    (lambda p: p.export_file_repository(), "file repository"),
    (lambda p: p.export_survey_queue_link("R1"), "survey queue"),
    (lambda p: p.export_survey_return_code("R1", "demographics", "baseline_arm_1"), "save and return"),
    (lambda p: p.export_survey_access_code("R1", "demographics", "baseline_arm_1"), "access codes"),
])
def test_unsupported_contents_raise_in_pycap_with_a_clear_message(server: LiveServer, call: Callable[[Any], Any],
                                                                  needle: str) -> None:
    known_data(server)
    project = redcap.Project(f"{server.url}/redcap/api/", token_for(server))
    with pytest.raises(redcap.RedcapError) as refused:
        call(project)
    assert needle in str(refused.value)


@pytest.mark.parametrize(("fields", "needle"), [
    ({"content": "pdf", "returnFormat": "json"}, "PDF"),
    ({"content": "file", "action": "export", "record": "R1", "field": "age", "event": "baseline_arm_1",
      "returnFormat": "json"}, "file upload"),
    ({"content": "file", "action": "import", "record": "R1", "field": "age", "returnFormat": "json"}, "file upload"),
    ({"content": "attachment", "returnFormat": "json"}, "attachments"),
])
def test_file_contents_are_errors(server: LiveServer, fields: dict[str, str], needle: str) -> None:
    """PyCap hands file answers back as bytes without looking for an error, so these are checked raw."""
    known_data(server)
    r = post(server, token_for(server), **fields)
    assert r.status_code == 400 and needle in r.json()["error"]


def test_contents_of_features_that_are_off_answer_as_redcap_does(server: LiveServer) -> None:
    known_data(server)
    project = redcap.Project(f"{server.url}/redcap/api/", token_for(server))
    assert project.export_repeating_instruments_events() == []
    assert project.export_dags() == []
    assert project.export_user_dag_assignment() == []
    assert project.export_repeating_instruments_events(format_type="csv").strip() == \
        "event_name,form_name,custom_form_label"
    info = project.export_project_info()
    assert isinstance(info["project_id"], int) and info["has_repeating_instruments_or_events"] == 0
    assert info["project_id"] == project.export_project_info()["project_id"]


def test_format_xml_is_a_redcap_error_and_the_version_needs_a_token(server: LiveServer) -> None:
    known_data(server)
    token = token_for(server)
    xml = post(server, token, content="record", format="xml")
    assert xml.status_code == 400 and "<error>" in xml.text and "format" in xml.text
    project = redcap.Project(f"{server.url}/redcap/api/", token)
    with pytest.raises(redcap.RedcapError, match="format"):
        project.export_records(format_type="xml")
    assert post(server, "F" * 32, content="version").status_code == 403
    assert "<error>" in post(server, "F" * 32, content="version").text  # PyCap raises on it
    with pytest.raises(redcap.RedcapError):
        redcap.Project(f"{server.url}/redcap/api/", "F" * 32).export_version()
    assert post(server, token, content="version").text.startswith("14.")
    # PyCap asks for a survey link with returnFormat=csv and no format: the link is plain text
    link = project.export_survey_link("R1", "demographics", event="baseline_arm_1")
    assert "/s/" in link


def test_the_log_honours_record_logtype_user_and_times(server: LiveServer) -> None:
    known_data(server)
    token = token_for(server)
    project = redcap.Project(f"{server.url}/redcap/api/", token)
    importer = redcap.Project(f"{server.url}/redcap/api/", token_for(server, "collector"))
    importer.import_records([form_row("R8", "demographics", {"income": "under_20k"}, "1")])
    everything = project.export_logging()
    r1 = project.export_logging(record="R1")
    assert r1 and all(e["record"] == "R1" for e in r1)
    assert any(e["action"] == "Created Record R1, event baseline_arm_1, forms " + ", ".join(
        i["key"] for i in pal_codebook()["instruments"] if "baseline" in i["waves"]) for e in r1)
    edits = project.export_logging(log_type="record_edit")
    assert edits and all(e["action"].startswith("Updated Record") for e in edits)
    assert any(e["action"] == "Updated Record R8, event baseline_arm_1, forms demographics" and "income" in e["details"]
               for e in edits)
    assert {e["action"].split()[0] for e in project.export_logging(log_type="record_add")} == {"Created"}
    assert project.export_logging(log_type="export") == []
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        collector_id = next(t["id"] for t in admin.get("/api/v1/tokens").json()["items"]
                            if t["label"] == "redcap collector")
    by_user = project.export_logging(user=collector_id)
    assert by_user and all(e["username"] == collector_id for e in by_user)
    assert any("R8" in e["action"] for e in by_user)
    future = datetime.now(UTC) + timedelta(days=2)
    assert project.export_logging(begin_time=future) == []
    assert len(project.export_logging(end_time=future)) == len(everything)
    assert project.export_logging(end_time=datetime.now(UTC) - timedelta(days=2)) == []
    bad = post(server, token, content="log", format="json", logtype="everything")
    assert bad.status_code == 400 and "logtype" in bad.json()["error"]


def test_csv_is_rfc_4180_and_formula_cells_are_neutralised(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        admin.post("/api/v1/studies", json={"key": "pal", "name": "=HYPERLINK(\"x\")\rtwo", "timezone": "UTC",
                                            "template": "pal-replication"})
    token = token_for(server)
    safe = post(server, token, content="project", format="csv")
    rows = list(csv.DictReader(io.StringIO(safe.text, newline="")))
    assert len(rows) == 1 and rows[0]["project_title"] == "'=HYPERLINK(\"x\")\rtwo"
    raw = post(server, token, content="project", format="csv", raw_cells="true")
    rows = list(csv.DictReader(io.StringIO(raw.text, newline="")))
    assert len(rows) == 1 and rows[0]["project_title"] == "=HYPERLINK(\"x\")\rtwo"
    assert raw.text.endswith("\r\n")
    for cell in ("+1+1", "-1+2", "@SUM(A1)", "\tx", "\rx"):
        assert post(server, token, content="project", format="csv").status_code == 200
        from app.redcap.router import _safe
        assert _safe(cell) == "'" + cell
    from app.redcap.router import _safe
    assert _safe("-3") == "-3" and _safe("2.5") == "2.5" and _safe("plain") == "plain"


def test_bad_imports_are_redcap_errors_never_500(server: LiveServer) -> None:
    known_data(server)
    token = token_for(server)
    long_row = post(server, token, content="record", format="csv", data="record_id,redcap_event_name,age\n"
                    "R8,baseline_arm_1,41,extra\n")
    assert long_row.status_code == 400 and "more cells" in long_row.text
    deep = "[" * 65 + "]" * 65
    nested = post(server, token, content="record", format="json", data=deep)
    assert nested.status_code == 400 and "64" in nested.json()["error"]
    very_deep = "[" * 100_000 + "]" * 100_000
    assert post(server, token, content="record", format="json", data=very_deep).status_code == 400
    for fields in ({"content": "record", "format": "json", "data": "{}"},
                   {"content": "record", "format": "json", "data": '[{"record_id": {"a": 1}}]'},
                   {"content": "record", "format": "json", "exportCheckboxLabel": "maybe"},
                   {"content": "record", "format": "json", "rawOrLabel": "both"},
                   {"content": "record", "format": "json", "action": "explode"},
                   {"content": "record", "format": "json", "data": "[]", "action": "import",
                    "overwriteBehavior": "erase"},
                   {"content": "metadata", "format": "json", "forms[0]": "nope"}):
        r = post(server, token, **fields)
        assert 400 <= r.status_code < 500, (fields, r.text)
        assert "error" in r.json()
