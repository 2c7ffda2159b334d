"""FHIR R4: Questionnaires from the codebook, QuestionnaireResponses through the native validation."""

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

R4 = pytest.importorskip("fhir.resources.R4B", reason="fhir.resources is in the dev extras")
from fhir.resources.R4B.bundle import Bundle  # noqa: E402
from fhir.resources.R4B.operationoutcome import OperationOutcome  # noqa: E402
from fhir.resources.R4B.questionnaire import Questionnaire  # noqa: E402
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse  # noqa: E402

WAVE = "https://cohort.invalid/fhir/StructureDefinition/wave"


@pytest.fixture
def server(fresh_db: URL, tmp_path: Path) -> Iterator[LiveServer]:
    with serve_app(make_settings(fresh_db, tmp_path, rate_limit_per_minute=0), fresh_db) as live:
        with httpx.Client(base_url=live.url, headers=auth(ADMIN_TOKEN)) as admin:
            admin.post("/api/v1/studies", json={"key": "pal", "name": "PAL", "timezone": "UTC",
                                                "template": "pal-replication"})
            for ext in ("F1", "F2"):
                admin.post("/api/v1/studies/pal/participants", json={
                    "external_id": ext, "enrolled_at": (datetime.now(UTC) - timedelta(days=5)).isoformat()})
        yield live


def collector(server: LiveServer) -> dict[str, str]:
    r = httpx.post(f"{server.url}/api/v1/tokens", json={"role": "collector", "label": "form renderer"},
                   headers=auth(ADMIN_TOKEN))
    return auth(r.json()["token"])


def instrument(key: str) -> dict[str, Any]:
    return next(i for i in pal_codebook()["instruments"] if i["key"] == key)


def response_for(ext: str, key: str, answers: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    """What a FHIR form renderer posts: typed value[x] per item (written here, not by the service)."""
    items = []
    for item in instrument(key)["items"]:
        if item["code"] not in answers:
            continue
        value = answers[item["code"]]
        values = value if isinstance(value, list) else [value]
        if item["type"] in ("single_choice", "multi_choice"):
            given = [{"valueCoding": {"code": v}} for v in values]
        elif item["type"] == "boolean":
            given = [{"valueBoolean": v} for v in values]
        elif item["type"] == "integer":
            given = [{"valueInteger": v} for v in values]
        elif item["type"] == "number":
            given = [{"valueDecimal": v} for v in values]
        else:
            given = [{"valueString": v} for v in values]
        items.append({"linkId": item["code"], "answer": given})
    return {"resourceType": "QuestionnaireResponse", "questionnaire": f"Questionnaire/pal-{key}", "status": status,
            "subject": {"identifier": {"value": ext}}, "extension": [{"url": WAVE, "valueCode": "baseline"}],
            "item": items}


def test_each_instrument_is_a_valid_questionnaire(server: LiveServer) -> None:
    for doc in pal_codebook()["instruments"]:
        r = httpx.get(f"{server.url}/fhir/Questionnaire/pal-{doc['key']}", headers=collector(server))
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
        q = Questionnaire.model_validate(r.json())  # a well-kept FHIR model library accepts it
        assert [i.linkId for i in q.item] == [i["code"] for i in doc["items"]]
        for produced, item in zip(q.item, doc["items"], strict=True):
            if item.get("options"):
                assert [o.valueCoding.code for o in produced.answerOption] == [o["code"] for o in item["options"]]
            assert bool(produced.enableWhen) == bool(item.get("enable_when"))
            assert produced.required == bool(item.get("required"))
    missing = httpx.get(f"{server.url}/fhir/Questionnaire/pal-nothing", headers=collector(server))
    assert missing.status_code == 404 and OperationOutcome.model_validate(missing.json()).issue[0].code == "not-found"


def test_a_questionnaire_response_lands_as_a_validated_response(server: LiveServer) -> None:
    answers = valid_answers("baseline", random.Random(7))
    demographics = {i["code"] for i in instrument("demographics")["items"]}
    own = {k: v for k, v in answers.items() if k in demographics}
    body = response_for("F1", "demographics", own, status="in-progress")
    QuestionnaireResponse.model_validate(body)  # the request itself is valid FHIR
    r = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", json=body, headers=collector(server))
    assert r.status_code == 201, r.text
    stored = QuestionnaireResponse.model_validate(r.json())
    assert stored.status == "in-progress" and stored.subject.identifier.value == "F1"
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        native = admin.get("/api/v1/studies/pal/responses", params={"external_id": "F1"}).json()["items"]
        assert len(native) == 1 and native[0]["answers"] == own and native[0]["status"] == "partial"
        # the search returns it as a Bundle
        bundle = Bundle.model_validate(admin.get(f"{server.url}/fhir/QuestionnaireResponse",
                                                 params={"subject": "F1", "questionnaire": "pal-demographics"}).json())
        assert bundle.total == 1 and bundle.entry[0].resource.id == f"{native[0]['id']}-demographics"
        audit = admin.get("/api/v1/studies/pal/audit", params={"table": "responses"}).json()["items"]
        assert any(e["row_id"] == native[0]["id"] for e in audit)


def test_bad_items_come_back_as_an_operation_outcome_and_nothing_is_stored(server: LiveServer) -> None:
    answers = valid_answers("baseline", random.Random(8))
    demographics = {i["code"] for i in instrument("demographics")["items"]}
    own = {k: v for k, v in answers.items() if k in demographics}
    body = response_for("F2", "demographics", own)
    for item in body["item"]:
        if item["linkId"] == "age":
            item["answer"] = [{"valueString": "40"}]  # no silent coercion, as in the native API
        if item["linkId"] == "gender":
            item["answer"] = [{"valueCoding": {"code": "unknown-code"}}]
    r = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", json=body, headers=collector(server))
    assert r.status_code == 422
    outcome = OperationOutcome.model_validate(r.json())
    flagged = {e for issue in outcome.issue for e in issue.expression or []}
    at = {item["linkId"]: n for n, item in enumerate(body["item"])}
    assert f"QuestionnaireResponse.item[{at['age']}].answer" in flagged  # FHIRPath to the posted answer
    assert f"QuestionnaireResponse.item[{at['gender']}].answer" in flagged
    with httpx.Client(base_url=server.url, headers=auth(ADMIN_TOKEN)) as admin:
        assert admin.get("/api/v1/studies/pal/responses", params={"external_id": "F2"}).json()["items"] == []
    unknown = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", headers=collector(server),
                         json=response_for("NOBODY", "demographics", own))
    assert unknown.status_code == 404 and OperationOutcome.model_validate(unknown.json())
    anonymous = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", json=body)
    assert anonymous.status_code == 401 and anonymous.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("body", [
    [],
    {"resourceType": "Patient"},
    {"resourceType": "QuestionnaireResponse", "questionnaire": "Questionnaire/pal-demographics",
     "status": "completed", "subject": "F1"},
    {"resourceType": "QuestionnaireResponse", "questionnaire": "Questionnaire/pal-demographics",
     "status": "finished", "subject": {"identifier": {"value": "F1"}}},
    {"resourceType": "QuestionnaireResponse", "questionnaire": "Questionnaire/pal-demographics",
     "status": "completed", "subject": {"identifier": {"value": "F1"}}, "extension": [{"url": WAVE}],
     "item": "age"},
    {"resourceType": "QuestionnaireResponse", "questionnaire": "Questionnaire/pal-demographics",
     "status": "completed", "subject": {"identifier": {"value": "F1"}}, "authored": "yesterday",
     "extension": [{"url": WAVE, "valueCode": "baseline"}], "item": [{"linkId": "age", "answer": [{}]}]},
])
def test_malformed_resources_are_refused_with_an_operation_outcome(server: LiveServer, body: Any) -> None:
    r = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", json=body, headers=collector(server))
    assert 400 <= r.status_code < 500, r.text
    assert OperationOutcome.model_validate(r.json()).issue
    not_json = httpx.post(f"{server.url}/fhir/QuestionnaireResponse", content=b"{", headers=collector(server))
    assert not_json.status_code == 400
