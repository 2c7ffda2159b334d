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
