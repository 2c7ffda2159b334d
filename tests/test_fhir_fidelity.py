"""FHIR fidelity (issue 17): discovery through /metadata and Questionnaire search, a QuestionnaireResponse per
(subject, wave, questionnaire) on per-instrument completion, read by Location, each search parameter with strict
and lenient handling. Driven by fhirpy and httpx; every resource is validated with fhir.resources' R4B models."""

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
from tests.factories import auth, pal_codebook, valid_answers

pytest.importorskip("fhir.resources.R4B", reason="fhir.resources is in the dev extras")
fhirpy = pytest.importorskip("fhirpy", reason="fhirpy is in the dev extras")
from fhir.resources.R4B.bundle import Bundle  # noqa: E402
from fhir.resources.R4B.capabilitystatement import CapabilityStatement  # noqa: E402
from fhir.resources.R4B.operationoutcome import OperationOutcome  # noqa: E402
from fhir.resources.R4B.questionnaire import Questionnaire  # noqa: E402
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse  # noqa: E402

WAVE = "https://cohort.invalid/fhir/StructureDefinition/wave"
REASON = "https://cohort.invalid/fhir/StructureDefinition/correction-reason"
BASELINE_FORMS = [i["key"] for i in pal_codebook()["instruments"] if "baseline" in i["waves"]]


@pytest.fixture
def server(fresh_db: URL, tmp_path: Path) -> Iterator[LiveServer]:
    with serve_app(make_settings(fresh_db, tmp_path, rate_limit_per_minute=0), fresh_db) as live:
        with httpx.Client(base_url=live.url, headers=auth(ADMIN_TOKEN)) as admin:
            admin.post("/api/v1/studies", json={"key": "pal", "name": "PAL", "timezone": "UTC",
                                                "template": "pal-replication"})
            for ext in ("F1", "F2", "F3"):
                admin.post("/api/v1/studies/pal/participants", json={
                    "external_id": ext, "enrolled_at": (datetime.now(UTC) - timedelta(days=5)).isoformat()})
        yield live


def token(server: LiveServer, role: str) -> str:
    r = httpx.post(f"{server.url}/api/v1/tokens", json={"role": role, "label": f"fhir {role}"},
                   headers=auth(ADMIN_TOKEN))
    value: str = r.json()["token"]
    return value


def instrument(key: str) -> dict[str, Any]:
    return next(i for i in pal_codebook()["instruments"] if i["key"] == key)


def qid(key: str) -> str:
    return f"pal-{key.replace('_', '.')}"


def response_for(ext: str, key: str, answers: dict[str, Any], status: str = "completed",
                 **extra: Any) -> dict[str, Any]:
    """What a FHIR form renderer posts for one questionnaire (typed value[x] per item, written here)."""
    items = []
    for item in instrument(key)["items"]:
        if item["code"] not in answers:
            continue
        value = answers[item["code"]]
        values = value if isinstance(value, list) else [value]
        kind = {"single_choice": "valueCoding", "multi_choice": "valueCoding", "boolean": "valueBoolean",
                "integer": "valueInteger", "number": "valueDecimal"}.get(item["type"], "valueString")
        given = [{kind: {"code": v} if kind == "valueCoding" else v} for v in values]
        if given:
            items.append({"linkId": item["code"], "answer": given})
    body = {"resourceType": "QuestionnaireResponse", "questionnaire": f"Questionnaire/{qid(key)}", "status": status,
            "subject": {"identifier": {"value": ext}}, "extension": [{"url": WAVE, "valueCode": "baseline"}],
            "item": items, **extra}
    QuestionnaireResponse.model_validate(body)  # every example the tests send is valid FHIR
    return body


def own(key: str, answers: dict[str, Any]) -> dict[str, Any]:
    codes = {i["code"] for i in instrument(key)["items"]}
    return {k: v for k, v in answers.items() if k in codes}


def native(server: LiveServer, ext: str) -> dict[str, Any]:
    items = httpx.get(f"{server.url}/api/v1/studies/pal/responses", params={"external_id": ext},
                      headers=auth(ADMIN_TOKEN)).json()["items"]
    assert len(items) == 1
    found: dict[str, Any] = items[0]
    return found


def search(server: LiveServer, params: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(f"{server.url}/fhir/QuestionnaireResponse", params=params,
                     headers={**auth(ADMIN_TOKEN), **(headers or {})})


def test_discovery_through_metadata_and_questionnaire_search(server: LiveServer) -> None:
    meta = httpx.get(f"{server.url}/fhir/metadata")
    assert meta.status_code == 200 and meta.headers["content-type"].startswith("application/fhir+json")
    statement = CapabilityStatement.model_validate(meta.json())
    assert statement.fhirVersion == "4.0.1"
    resources = {r.type: r for r in statement.rest[0].resource}
    assert set(resources) == {"Questionnaire", "QuestionnaireResponse"}
    assert {i.code for i in resources["Questionnaire"].interaction} == {"read", "search-type"}
    assert {i.code for i in resources["QuestionnaireResponse"].interaction} == {"read", "create", "search-type"}
    assert {p.name for p in resources["Questionnaire"].searchParam} == {"url", "name", "status", "_count"}
    assert {p.name for p in resources["QuestionnaireResponse"].searchParam} == {
        "subject", "questionnaire", "status", "authored", "_lastUpdated", "_count"}
    assert "vread" in statement.rest[0].documentation and resources["QuestionnaireResponse"].readHistory is False

    client = fhirpy.SyncFHIRClient(f"{server.url}/fhir", authorization=f"Bearer {token(server, 'collector')}")
    found = client.resources("Questionnaire").fetch_all()
    assert sorted(q["name"] for q in found) == sorted(i["key"] for i in pal_codebook()["instruments"])
    for q in found:
        Questionnaire.model_validate(q.serialize())
    by_name = client.resources("Questionnaire").search(name="demographics").fetch()
    assert [q["id"] for q in by_name] == ["pal-demographics"]
    assert [q["id"] for q in client.resources("Questionnaire").search(name="SELF").fetch()] == ["pal-self.efficacy"]
    by_url = client.resources("Questionnaire").search(url=by_name[0]["url"]).fetch()
    assert [q["id"] for q in by_url] == ["pal-demographics"]
    assert client.resources("Questionnaire").search(status="draft").fetch() == []
    assert len(client.resources("Questionnaire").search(status="active").fetch()) == len(found)
    read = client.reference("Questionnaire", "pal-demographics").to_resource()
    assert read["url"] == by_name[0]["url"]
    strict = httpx.get(f"{server.url}/fhir/Questionnaire", params={"title": "x"}, headers=auth(ADMIN_TOKEN))
    assert strict.status_code == 400 and OperationOutcome.model_validate(strict.json()).issue[0].code == "not-supported"


def test_post_then_read_by_location_and_one_resource_per_questionnaire(server: LiveServer) -> None:
    answers = valid_answers("baseline", random.Random(11), groups_30d=["smart"])
    collector = auth(token(server, "collector"))
    demo = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", headers=collector,
                      json=response_for("F1", "demographics", own("demographics", answers)))
    assert demo.status_code == 201, demo.text
    location = demo.headers["Location"]
    read = httpx.get(f"{server.url}{location}", headers=collector)
    assert read.status_code == 200 and read.json() == demo.json()
    first = QuestionnaireResponse.model_validate(read.json())
    assert first.status == "completed" and first.questionnaire.endswith("/Questionnaire/pal-demographics")
    assert {i.linkId for i in first.item} == set(own("demographics", answers))

    subst = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", headers=collector,
                       json=response_for("F1", "substance_use", own("substance_use", answers), "in-progress"))
    assert subst.status_code == 201, subst.text
    second = QuestionnaireResponse.model_validate(subst.json())
    assert second.id != first.id and second.status == "in-progress"
    # the first resource is unchanged: it still names its own questionnaire
    again = QuestionnaireResponse.model_validate(httpx.get(f"{server.url}{location}", headers=collector).json())
    assert again.questionnaire == first.questionnaire and again.status == "completed"
    stored = native(server, "F1")
    assert stored["status"] == "partial"
    assert stored["instruments"] == {"demographics": "complete", "substance_use": "partial",
                                     **{f: "not_started" for f in BASELINE_FORMS[2:]}}
    # a form not started has no resource
    missing = httpx.get(f"{server.url}/fhir/QuestionnaireResponse/{stored['id']}-mutual.help",
                        headers=auth(ADMIN_TOKEN))
    assert missing.status_code == 404 and OperationOutcome.model_validate(missing.json())

    # the same completed resource again is a no-op; changing it is a conflict (amended is the way)
    same = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", headers=collector,
                      json=response_for("F1", "demographics", own("demographics", answers)))
    assert same.status_code == 200 and same.headers["Location"] == location
    changed = own("demographics", answers) | {"age": 77 if answers["age"] != 77 else 78}
    conflict = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", headers=collector,
                          json=response_for("F1", "demographics", changed))
    assert conflict.status_code == 409 and "amended" in conflict.text

    for key in BASELINE_FORMS[1:]:
        r = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", headers=collector,
                       json=response_for("F1", key, own(key, answers)))
        assert r.status_code in (200, 201), r.text
        assert QuestionnaireResponse.model_validate(r.json()).status == "completed"
    assert native(server, "F1")["status"] == "complete"
    # another collector cannot read this participant's answers; a coordinator can
    assert httpx.get(f"{server.url}{location}", headers=auth(token(server, "collector"))).status_code == 403
    assert httpx.get(f"{server.url}{location}", headers=auth(token(server, "coordinator"))).status_code == 200


def test_amended_corrects_a_completed_questionnaire_through_the_audited_path(server: LiveServer) -> None:
    answers = valid_answers("baseline", random.Random(12), groups_30d=["smart"])
    demo = own("demographics", answers)
    collector, coordinator = auth(token(server, "collector")), auth(token(server, "coordinator"))
    url = f"{server.url}/fhir/QuestionnaireResponse"
    early = httpx.post(url, headers=coordinator, json=response_for("F2", "demographics", demo, "amended",
                                                                   extension=[{"url": WAVE, "valueCode": "baseline"},
                                                                              {"url": REASON, "valueString": "x"}]))
    assert early.status_code == 422  # nothing completed to amend yet
    assert httpx.post(url, headers=collector, json=response_for("F2", "demographics", demo)).status_code == 201
    fixed = demo | {"age": 30 if demo["age"] != 30 else 31}
    no_reason = httpx.post(url, headers=coordinator, json=response_for("F2", "demographics", fixed, "amended"))
    assert no_reason.status_code == 422
    issue = OperationOutcome.model_validate(no_reason.json()).issue[0]
    assert issue.expression == ["QuestionnaireResponse.text"]
    by_collector = httpx.post(url, headers=collector, json=response_for(
        "F2", "demographics", fixed, "amended", text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">typo</div>'}))
    assert by_collector.status_code == 403

    amended = httpx.post(url, headers=coordinator, json=response_for(
        "F2", "demographics", fixed, "amended",
        extension=[{"url": WAVE, "valueCode": "baseline"}, {"url": REASON, "valueString": "age misread"}]))
    assert amended.status_code == 200, amended.text
    resource = QuestionnaireResponse.model_validate(amended.json())
    assert resource.status == "amended"
    assert next(i.answer[0].valueInteger for i in resource.item if i.linkId == "age") == fixed["age"]
    stored = native(server, "F2")
    assert stored["answers"]["age"] == fixed["age"]
    assert stored["corrections"][0]["reason"] == "age misread"
    assert stored["corrections"][0]["before"] == {"age": demo["age"]}
    # the narrative's text is a reason too
    again = httpx.post(url, headers=coordinator, json=response_for(
        "F2", "demographics", fixed | {"age": 45}, "amended",
        text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"><p>second look</p></div>'}))
    assert again.status_code == 200 and native(server, "F2")["corrections"][-1]["reason"] == "second look"


def test_search_parameters(server: LiveServer) -> None:
    collector = auth(token(server, "collector"))
    url = f"{server.url}/fhir/QuestionnaireResponse"
    for n, ext in enumerate(("F1", "F2", "F3")):
        answers = valid_answers("baseline", random.Random(20 + n), groups_30d=["smart"])
        authored = f"2026-0{n + 1}-15T10:00:00+00:00"
        assert httpx.post(url, headers=collector, json=response_for(
            ext, "demographics", own("demographics", answers), authored=authored)).status_code == 201
        if ext != "F3":
            assert httpx.post(url, headers=collector, json=response_for(
                ext, "substance_use", own("substance_use", answers), "in-progress")).status_code == 201

    def ids(params: Any, headers: dict[str, str] | None = None) -> set[tuple[str, str]]:
        r = search(server, params, headers)
        assert r.status_code == 200, r.text
        bundle = Bundle.model_validate(r.json())
        return {(e.resource.subject.identifier.value, e.resource.questionnaire.rsplit("/", 1)[-1])
                for e in bundle.entry or []}

    everything = {("F1", qid("demographics")), ("F2", qid("demographics")), ("F3", qid("demographics")),
                  ("F1", qid("substance_use")), ("F2", qid("substance_use"))}
    assert ids({}) == everything
    assert ids({"subject:identifier": "F1"}) == {e for e in everything if e[0] == "F1"}
    assert ids({"subject:identifier": "urn:cohort:pal|F2"}) == {e for e in everything if e[0] == "F2"}
    assert ids({"subject": "Patient/F3"}) == {("F3", qid("demographics"))}
    assert ids({"questionnaire": "Questionnaire/pal-substance.use"}) == {e for e in everything
                                                                         if e[1] == qid("substance_use")}
    assert ids({"status": "in-progress"}) == {e for e in everything if e[1] == qid("substance_use")}
    assert ids({"status": "completed", "subject:identifier": "F2"}) == {("F2", qid("demographics"))}
    assert ids({"status": "amended"}) == set()
    demo = {"questionnaire": "pal-demographics"}
    assert ids({**demo, "authored": "ge2026-02-01"}) == {("F2", qid("demographics")), ("F3", qid("demographics"))}
    assert ids({**demo, "authored": "le2026-02-15"}) == {("F1", qid("demographics")), ("F2", qid("demographics"))}
    assert ids({**demo, "authored": "gt2026-02-15"}) == {("F3", qid("demographics"))}
    assert ids({**demo, "authored": "lt2026-02-15"}) == {("F1", qid("demographics"))}
    assert ids([*demo.items(), ("authored", "ge2026-02-01"), ("authored", "lt2026-03-01")]) == {
        ("F2", qid("demographics"))}
    assert ids({**demo, "authored": "2026-03"}) == {("F3", qid("demographics"))}
    now = datetime.now(UTC)
    assert ids({"_lastUpdated": f"ge{(now - timedelta(hours=1)).strftime('%Y-%m-%dT%H:%M:%SZ')}"}) == everything
    assert ids({"_lastUpdated": f"gt{(now + timedelta(hours=1)).strftime('%Y-%m-%dT%H:%M:%SZ')}"}) == set()

    # _count pages with self and next links that resolve
    seen: list[str] = []
    page = search(server, {"_count": "2"}).json()
    while True:
        bundle = Bundle.model_validate(page)
        assert bundle.total == len(everything)
        links = {link.relation: link.url for link in bundle.link}
        assert "self" in links
        seen += [e.resource.id for e in bundle.entry or []]
        if "next" not in links:
            break
        page = httpx.get(links["next"].replace("http://testserver", server.url), headers=auth(ADMIN_TOKEN)).json()
    assert len(seen) == len(set(seen)) == len(everything)

    # strict by default, lenient on request (the ignored parameter is left out of self)
    strict = search(server, {"subject:identifier": "F1", "_sort": "authored"})
    assert strict.status_code == 400
    outcome = OperationOutcome.model_validate(strict.json())
    assert outcome.issue[0].code == "not-supported" and "_sort" in outcome.issue[0].details.text
    lenient = search(server, {"subject:identifier": "F1", "_sort": "authored"}, {"Prefer": "handling=lenient"})
    assert lenient.status_code == 200
    bundle = Bundle.model_validate(lenient.json())
    assert {e.resource.subject.identifier.value for e in bundle.entry} == {"F1"}
    self_link = next(link.url for link in bundle.link if link.relation == "self")
    assert "_sort" not in self_link and "subject%3Aidentifier=F1" in self_link
    for bad in ({"authored": "ge-yesterday"}, {"status": "finished"}, {"_count": "many"}):
        r = search(server, bad)
        assert r.status_code == 400 and OperationOutcome.model_validate(r.json()).issue, bad

    # fhirpy finds a subject's responses the way an integration would
    client = fhirpy.SyncFHIRClient(f"{server.url}/fhir", authorization=f"Bearer {ADMIN_TOKEN}")
    found = client.resources("QuestionnaireResponse").search(**{"subject:identifier": "F2"}).fetch_all()
    assert {r["questionnaire"].rsplit("/", 1)[-1] for r in found} == {qid("demographics"), qid("substance_use")}


def test_fhirpy_posts_a_response_per_questionnaire_and_reads_it_back(server: LiveServer) -> None:
    client = fhirpy.SyncFHIRClient(f"{server.url}/fhir", authorization=f"Bearer {token(server, 'coordinator')}")
    answers = valid_answers("baseline", random.Random(30), groups_30d=["smart"])
    made = []
    for key in ("demographics", "aud_criteria"):
        resource = client.resource("QuestionnaireResponse", **response_for("F3", key, own(key, answers)))
        resource.save()
        assert resource["id"] and resource["status"] == "completed"
        made.append(resource["id"])
    assert len(set(made)) == 2
    for rid in made:
        back = client.reference("QuestionnaireResponse", rid).to_resource()
        QuestionnaireResponse.model_validate(back.serialize())
    found = client.resources("QuestionnaireResponse").search(**{"subject:identifier": "F3"}).fetch_all()
    assert {r["id"] for r in found} == set(made)


@pytest.mark.parametrize(("body", "status", "expression"), [
    ({"item": [{"linkId": "age", "answer": []}]}, 422, "QuestionnaireResponse.item[0].answer"),
    ({"item": [{"linkId": "gender", "answer": [{"valueCoding": {"code": "woman"}}]},
               {"linkId": "age", "answer": [{"valueString": "40"}]}]}, 422, "QuestionnaireResponse.item[1].answer"),
    ({"item": [{"linkId": "alcohol_last_use", "answer": [{"valueCoding": {"code": "over_1y"}}]}]}, 422,
     "QuestionnaireResponse.item[0].linkId"),
    ({"extension": []}, 422, "QuestionnaireResponse.extension"),
    ({"extension": [{"url": WAVE}]}, 422, "QuestionnaireResponse.extension[0]"),
    ({"extension": [{"url": WAVE, "valueCode": "month99"}]}, 422,
     f"QuestionnaireResponse.extension.where(url='{WAVE}')"),
    ({"subject": {"identifier": {"system": "x"}}}, 422, "QuestionnaireResponse.subject.identifier.value"),
    ({"status": "stopped"}, 422, "QuestionnaireResponse.status"),
    ({"authored": "yesterday"}, 422, "QuestionnaireResponse.authored"),
])
def test_errors_point_at_the_resource_with_fhirpath(server: LiveServer, body: dict[str, Any], status: int,
                                                     expression: str) -> None:
    base = {"resourceType": "QuestionnaireResponse", "questionnaire": "Questionnaire/pal-demographics",
            "status": "in-progress", "subject": {"identifier": {"value": "F1"}},
            "extension": [{"url": WAVE, "valueCode": "baseline"}]}
    r = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", json=base | body, headers=auth(ADMIN_TOKEN))
    assert r.status_code == status, r.text
    outcome = OperationOutcome.model_validate(r.json())
    assert expression in {e for issue in outcome.issue for e in issue.expression or []}, r.text


def test_json_nested_deeper_than_64_levels_is_a_400(server: LiveServer) -> None:
    for depth in (65, 100_000):
        body = '{"resourceType": "QuestionnaireResponse", "item": ' + "[" * depth + "]" * depth + "}"
        r = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", content=body.encode(),
                       headers={**auth(ADMIN_TOKEN), "content-type": "application/fhir+json"})
        assert r.status_code == 400 and OperationOutcome.model_validate(r.json()).issue


@pytest.mark.parametrize("change", [
    {"basedOn": 7}, {"extension": 7}, {"extension": [7]}, {"item": {"linkId": "age"}}, {"item": [{"linkId": 5}]},
    {"item": [{"linkId": "age", "answer": {"valueInteger": 40}}]}, {"item": [{"linkId": "age", "answer": [7]}]},
    {"text": 7}, {"text": {"div": 7}}, {"subject": []}, {"authored": 7}, {"authored": "2026-01-01T10:00:00"},
    {"questionnaire": 7}, {"questionnaire": "Questionnaire/"}, {"status": ["completed"]},
    {"item": [{"linkId": "age", "answer": [{"valueInteger": 40, "valueString": "x"}]}]},
])
def test_odd_resources_are_4xx_never_500(server: LiveServer, change: dict[str, Any]) -> None:
    base = {"resourceType": "QuestionnaireResponse", "questionnaire": "Questionnaire/pal-demographics",
            "status": "amended", "subject": {"identifier": {"value": "F1"}},
            "extension": [{"url": WAVE, "valueCode": "baseline"}]}
    r = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", json=base | change, headers=auth(ADMIN_TOKEN))
    assert 400 <= r.status_code < 500, r.text
    assert OperationOutcome.model_validate(r.json()).issue


@pytest.mark.parametrize("params", [
    {"authored": "ge2026-13"}, {"authored": "ge0000"}, {"_lastUpdated": "9999-12"}, {"_count": "-1"},
    {"_count": "100000"}, {"questionnaire": "nothing"}, {"subject": ""}, {"authored": "ge2026-01-01T10:00:00+99:00"},
])
def test_odd_searches_are_4xx_or_empty_never_500(server: LiveServer, params: dict[str, str]) -> None:
    r = search(server, params)
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        Bundle.model_validate(r.json())
    else:
        OperationOutcome.model_validate(r.json())
    for bad in ("/fhir/QuestionnaireResponse/x", "/fhir/QuestionnaireResponse/" + "0" * 36 + "-demographics"):
        assert httpx.get(f"{server.url}{bad}", headers=auth(ADMIN_TOKEN)).status_code == 404
