"""FHIR R4: instruments as Questionnaires, responses as QuestionnaireResponses (ids: `pal-substance.use`
for study `pal`, instrument `substance_use`; the underscore form is accepted in paths too).

`GET /fhir/Questionnaire/{study}-{instrument}`; `POST /fhir/QuestionnaireResponse` stores a response
through the same validation as `POST /api/v1/studies/{key}/responses` (subject identifier =
external_id, the wave in the `.../StructureDefinition/wave` extension or `basedOn.identifier`);
`GET /fhir/QuestionnaireResponse?subject=&questionnaire=` returns a searchset Bundle. Errors are
OperationOutcomes with one issue per bad item. Bearer tokens as everywhere else.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.core.db import SessionDep
from app.core.errors import DomainError, Forbidden, Invalid, Malformed, NotFound
from app.core.security import Principal, Role, authenticate
from app.core.timeutil import utcnow
from app.fhir import repository
from app.instruments.codebook import Codebook
from app.responses import service as responses
from app.responses.models import Response as StoredResponse
from app.responses.schemas import ResponseIn
from app.studies import service as studies
from app.studies.service import StudyContext

router = APIRouter(prefix="/fhir", include_in_schema=False)

FHIR_JSON = "application/fhir+json"
WAVE_EXTENSION = "https://cohort.invalid/fhir/StructureDefinition/wave"
TYPES = {"single_choice": "choice", "multi_choice": "choice", "integer": "integer", "number": "decimal",
         "boolean": "boolean", "text": "string", "date": "date"}
VALUE_KEYS = {"integer": "valueInteger", "number": "valueDecimal", "boolean": "valueBoolean", "text": "valueString",
              "date": "valueDate"}
OPERATORS = {"==": "=", "!=": "!=", ">": ">", ">=": ">=", "<": "<", "<=": "<="}
STATUS = {"completed": "complete", "amended": "complete", "in-progress": "partial"}
ISSUE_CODES = {"required": "required", "type": "value", "range": "value", "option": "code-invalid",
               "unknown_item": "not-found", "not_in_wave": "business-rule", "not_enabled": "business-rule",
               "rule": "business-rule"}


def fhir(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def outcome(exc: DomainError) -> JSONResponse:
    issues = []
    for e in exc.errors or []:
        loc = [str(p) for p in e.get("loc", [])]
        code = loc[-1] if loc else ""
        issues.append({"severity": "error", "code": ISSUE_CODES.get(e.get("code", ""), "invalid"),
                       "details": {"text": f"{e.get('code')}: {e.get('message')}"},
                       "expression": [f"QuestionnaireResponse.item.where(linkId='{code}')" if loc[:1] == ["answers"]
                                      else f"QuestionnaireResponse.{'.'.join(loc)}"]})
    if not issues:
        code = {401: "login", 403: "forbidden", 404: "not-found", 409: "conflict"}.get(exc.status_code, "invalid")
        issues.append({"severity": "error", "code": code, "details": {"text": exc.detail}})
    return fhir({"resourceType": "OperationOutcome", "issue": issues}, exc.status_code, exc.headers)


def _who(request: Request, session: Session, *roles: Role) -> Principal:
    principal = authenticate(request, session)
    if not principal.may(*roles):
        raise Forbidden(f"the {principal.role} role may not do this")
    return principal


def _instrument(session: Session, principal: Principal, questionnaire_id: str) -> tuple[StudyContext, dict[str, Any]]:
    key, _, instrument = questionnaire_id.rpartition("-")
    instrument = instrument.replace(".", "_")  # FHIR ids allow no underscore: pal-substance.use
    if not key:
        raise NotFound(f"no Questionnaire {questionnaire_id!r} (ids are <study>-<instrument>)")
    ctx = studies.context(session, key, principal)
    for doc in ctx.require_codebook().document["instruments"]:
        if doc["key"] == instrument:
            return ctx, doc
    raise NotFound(f"study {key!r} has no instrument {instrument!r}")


def _questionnaire_id(reference: str) -> str:
    """`Questionnaire/pal-demographics`, a canonical URL ending in it, or the bare id."""
    return reference.rstrip("/").split("|")[0].rsplit("/", 1)[-1]


def fhir_id(ctx: StudyContext, instrument_key: str) -> str:
    """`<study>-<instrument>`, with underscores (not allowed in FHIR ids) written as dots."""
    return f"{ctx.study.key}-{instrument_key.replace('_', '.')}"


def questionnaire(request: Request, ctx: StudyContext, doc: dict[str, Any]) -> dict[str, Any]:
    qid = fhir_id(ctx, doc["key"])
    by_code = {i["code"]: i for i in doc["items"]}
    items = []
    for item in doc["items"]:
        out: dict[str, Any] = {"linkId": item["code"], "text": item["label"], "type": TYPES[item["type"]],
                               "required": bool(item.get("required"))}
        if item["type"] == "multi_choice":
            out["repeats"] = True
        if item.get("options"):
            out["answerOption"] = [{"valueCoding": {"code": o["code"], "display": o["label"]}}
                                   for o in item["options"]]
        extensions = [{"url": WAVE_EXTENSION, "valueCode": w} for w in item["waves"]]
        for bound, url in (("min", "minValue"), ("max", "maxValue")):
            if item.get(bound) is not None:
                key = "valueInteger" if item["type"] == "integer" else "valueDecimal"
                extensions.append({"url": f"http://hl7.org/fhir/StructureDefinition/{url}", key: item[bound]})
        out["extension"] = extensions
        if item.get("enable_when"):
            out.update(_enable_when(item["enable_when"], by_code))
        items.append(out)
    return {"resourceType": "Questionnaire", "id": qid,
            "url": f"{str(request.base_url).rstrip('/')}/fhir/Questionnaire/{qid}", "name": doc["key"],
            "title": doc["label"], "status": "active", "subjectType": ["Patient"], "item": items}


def _answer_value(source: dict[str, Any] | None, value: Any) -> dict[str, Any]:
    kind = (source or {}).get("type")
    if kind in ("single_choice", "multi_choice"):
        return {"answerCoding": {"code": str(value)}}
    if isinstance(value, bool) or kind == "boolean":
        return {"answerBoolean": bool(value)}
    if kind == "integer" or isinstance(value, int):
        return {"answerInteger": value}
    if isinstance(value, float) or kind == "number":
        return {"answerDecimal": value}
    return {"answerString": str(value)}


def _enable_when(cond: dict[str, Any], by_code: dict[str, Any]) -> dict[str, Any]:
    source = by_code.get(cond["item"])
    op, value = cond["operator"], cond.get("value")
    if op == "exists":
        return {"enableWhen": [{"question": cond["item"], "operator": "exists", "answerBoolean": True}]}
    if op in ("in", "not_in"):
        values = value if isinstance(value, list) else [value]
        fhir_op = "=" if op == "in" else "!="
        return {"enableWhen": [{"question": cond["item"], "operator": fhir_op, **_answer_value(source, v)}
                               for v in values], "enableBehavior": "any" if op == "in" else "all"}
    return {"enableWhen": [{"question": cond["item"], "operator": OPERATORS[op], **_answer_value(source, value)}]}


@router.get("/Questionnaire/{questionnaire_id}")
def get_questionnaire(questionnaire_id: str, request: Request, session: SessionDep) -> JSONResponse:
    try:
        principal = _who(request, session, "coordinator", "collector", "analyst")
        ctx, doc = _instrument(session, principal, questionnaire_id)
        return fhir(questionnaire(request, ctx, doc))
    except DomainError as exc:
        return outcome(exc)


# -- responses ------------------------------------------------------------------------------------


def _flatten(items: list[Any]) -> list[dict[str, Any]]:
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise Malformed("every item must be an object")
        out.append(item)
        out += _flatten(item.get("item") or [])
        for answer in item.get("answer") or []:
            out += _flatten(answer.get("item") or []) if isinstance(answer, dict) else []
    return out


def _value(answer: dict[str, Any]) -> Any:
    values = [(k, v) for k, v in answer.items() if k.startswith("value")]
    if len(values) != 1:
        raise ValueError("an answer has exactly one value[x]")
    key, value = values[0]
    if key == "valueCoding":
        if not isinstance(value, dict) or "code" not in value:
            raise ValueError("valueCoding needs a code")
        return value["code"]
    return value  # valueInteger, valueDecimal, valueBoolean, valueString, valueDate: typed by JSON


def answers_of(resource: dict[str, Any], codebook: Codebook) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    errors = []
    for item in _flatten(resource.get("item") or []):
        code = item.get("linkId")
        given = [a for a in item.get("answer") or [] if isinstance(a, dict)]
        if not code or not given:
            continue  # a group, or an item left unanswered
        try:
            values = [_value(a) for a in given]
        except ValueError as exc:
            errors.append({"loc": ["answers", code], "code": "type", "message": str(exc)})
            continue
        known = codebook.items.get(code)
        answers[code] = values if known is not None and known.type == "multi_choice" else (
            values[0] if len(values) == 1 else values)
    if errors:
        raise Invalid("some answers could not be read", errors=errors)
    return answers


def _dig(value: Any, *path: str) -> Any:
    """value[path[0]][path[1]]..., or None where a level is missing or not an object."""
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _wave(resource: dict[str, Any]) -> str:
    for ext in resource.get("extension") or []:
        if isinstance(ext, dict) and str(ext.get("url", "")).endswith("/StructureDefinition/wave"):
            return str(ext.get("valueCode") or ext.get("valueString") or "")
    for ref in resource.get("basedOn") or []:
        value = _dig(ref, "identifier", "value")
        if value:
            return str(value)
    raise Invalid("name the wave", errors=[{"loc": ["extension"], "code": "required", "message":
                                            f"an extension {WAVE_EXTENSION} (valueCode) or basedOn.identifier"}])


def response_resource(request: Request, ctx: StudyContext, row: StoredResponse, external_id: str,
                      instrument: dict[str, Any] | None = None) -> dict[str, Any]:
    codebook = ctx.require_codebook()
    docs = [instrument] if instrument else [d for d in codebook.document["instruments"]
                                            if any(row.wave in i["waves"] for i in d["items"])]
    items = []
    for doc in docs:
        for item in doc["items"]:
            if item["code"] not in row.answers:
                continue
            value = row.answers[item["code"]]
            answers = [_answer_value(item, v) for v in (value if isinstance(value, list) else [value])]
            items.append({"linkId": item["code"], "answer": [{k.replace("answer", "value", 1): v for k, v in a.items()}
                                                             for a in answers]})
    qid = fhir_id(ctx, docs[0]["key"] if len(docs) == 1 else row.wave)
    base = str(request.base_url).rstrip("/")
    return {"resourceType": "QuestionnaireResponse", "id": str(row.id),
            "questionnaire": f"{base}/fhir/Questionnaire/{qid}",
            "status": "completed" if row.status == "complete" else "in-progress",
            "subject": {"identifier": {"value": external_id}},
            "authored": (row.completed_at or row.received_at).isoformat(),
            "extension": [{"url": WAVE_EXTENSION, "valueCode": row.wave}], "item": items}


@router.post("/QuestionnaireResponse")
async def post_response(request: Request, session: SessionDep) -> JSONResponse:
    try:
        try:
            resource = await request.json()
        except ValueError:
            raise Malformed("the body is not JSON") from None
        return await _store(request, session, resource)
    except DomainError as exc:
        session.rollback()
        return outcome(exc)


async def _store(request: Request, session: Session, resource: Any) -> JSONResponse:
    from starlette.concurrency import run_in_threadpool

    if not isinstance(resource, dict) or resource.get("resourceType") != "QuestionnaireResponse":
        raise Invalid("expected a QuestionnaireResponse", errors=[
            {"loc": ["resourceType"], "code": "type", "message": "must be QuestionnaireResponse"}])

    def store() -> JSONResponse:
        principal = _who(request, session, "coordinator", "collector")
        ctx, doc = _instrument(session, principal, _questionnaire_id(str(resource.get("questionnaire") or "")))
        external_id = _dig(resource, "subject", "identifier", "value")
        if not isinstance(external_id, str) or not external_id:
            raise Invalid("the subject is missing", errors=[
                {"loc": ["subject", "identifier", "value"], "code": "required", "message": "the external_id"}])
        status = STATUS.get(str(resource.get("status")))
        if status is None:
            raise Invalid("unsupported status", errors=[{"loc": ["status"], "code": "option", "message":
                                                         "completed, amended or in-progress"}])
        authored = resource.get("authored")
        try:
            data = ResponseIn(external_id=str(external_id), wave=_wave(resource), status=status,
                              completed_at=datetime.fromisoformat(authored) if authored else None,
                              answers=answers_of(resource, ctx.require_codebook()))
        except (ValidationError, ValueError) as exc:
            raise Invalid(f"the resource could not be read: {exc}".splitlines()[0]) from None
        created, fresh = responses.submit(session, ctx, data, principal, utcnow())
        row = session.get(StoredResponse, created.id)
        assert row is not None
        body = response_resource(request, ctx, row, data.external_id, doc)
        return fhir(body, 201 if fresh else 200, {"Location": f"/fhir/QuestionnaireResponse/{created.id}"})

    return await run_in_threadpool(store)


@router.get("/QuestionnaireResponse")
def search_responses(request: Request, session: SessionDep, subject: str | None = None,
                     questionnaire: str | None = None) -> JSONResponse:
    try:
        principal = _who(request, session, "coordinator")
        if not questionnaire:
            raise Invalid("give questionnaire (a study's instrument)", errors=[
                {"loc": ["questionnaire"], "code": "required", "message": "e.g. pal-demographics"}])
        ctx, doc = _instrument(session, principal, _questionnaire_id(questionnaire))
        codes = {i["code"] for i in doc["items"]}
        entries = []
        subject_id = subject.rsplit("|", 1)[-1] if subject else None
        for row, external_id in repository.responses_with_ids(session, ctx.study.id, subject_id):
            if not codes & set(row.answers):
                continue
            resource = response_resource(request, ctx, row, external_id, doc)
            entries.append({"fullUrl": f"{str(request.base_url).rstrip('/')}/fhir/QuestionnaireResponse/{row.id}",
                            "resource": resource, "search": {"mode": "match"}})
        return fhir({"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "searchset", "total": len(entries),
                     "entry": entries})
    except DomainError as exc:
        return outcome(exc)
