"""FHIR R4 (validated in tests with fhir.resources' R4B models): instruments as Questionnaires, each
(subject, wave, questionnaire) as its own QuestionnaireResponse mapped onto per-instrument completion
(contract section 5). Questionnaire ids are `<study>-<instrument>` with the instrument's underscores
written as dots (`pal-substance.use`); QuestionnaireResponse ids are `<response id>-<instrument>`.

`GET /fhir/metadata` lists exactly what is served: Questionnaire read and search (`url`, `name`,
`status`); QuestionnaireResponse create, read and search (`subject`, `subject:identifier`,
`questionnaire`, `status`, `authored`, `_lastUpdated`, `_count`). A search parameter not listed
is a 400 OperationOutcome unless the client sends `Prefer: handling=lenient`. Posting `completed`
completes that instrument only, `in-progress` saves it partial, and `amended` corrects a completed
one through the audited correction path (coordinators; the reason from the extension
`.../StructureDefinition/correction-reason` or the resource's `text`). Errors are OperationOutcomes
whose issue expressions are FHIRPath. Bearer tokens as everywhere else.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.core.db import SessionDep
from app.core.errors import AlreadyComplete, DomainError, Forbidden, Invalid, Malformed, NotFound
from app.core.inputs import MAX_JSON_DEPTH, parsed_depth
from app.core.security import Principal, Role, authenticate_now
from app.core.timeutil import utcnow
from app.fhir import repository
from app.instruments.codebook import Codebook
from app.responses import service as responses
from app.responses.models import Response as StoredResponse
from app.responses.schemas import CorrectionIn, ResponseIn
from app.studies import service as studies
from app.studies.service import StudyContext

router = APIRouter(prefix="/fhir", include_in_schema=False)

FHIR_JSON = "application/fhir+json"
FHIR_VERSION = "4.0.1"
WAVE_EXTENSION = "https://cohort.invalid/fhir/StructureDefinition/wave"
REASON_EXTENSION = "https://cohort.invalid/fhir/StructureDefinition/correction-reason"
TYPES = {"single_choice": "choice", "multi_choice": "choice", "integer": "integer", "number": "decimal",
         "boolean": "boolean", "text": "string", "date": "date"}
VALUE_KEYS = {"integer": "valueInteger", "number": "valueDecimal", "boolean": "valueBoolean", "text": "valueString",
              "date": "valueDate"}
OPERATORS = {"==": "=", "!=": "!=", ">": ">", ">=": ">=", "<": "<", "<=": "<="}
STATUSES = ("completed", "in-progress", "amended")
ISSUE_CODES = {"required": "required", "type": "value", "range": "value", "option": "code-invalid",
               "unknown_item": "not-found", "not_in_wave": "business-rule", "not_enabled": "business-rule",
               "rule": "business-rule", "structure": "structure", "not-supported": "not-supported"}
# Where the native API's names live in a QuestionnaireResponse, as FHIRPath.
EXPRESSIONS = {"external_id": "QuestionnaireResponse.subject.identifier.value",
               "wave": f"QuestionnaireResponse.extension.where(url='{WAVE_EXTENSION}')",
               "completed_at": "QuestionnaireResponse.authored", "status": "QuestionnaireResponse.status",
               "complete_instruments": "QuestionnaireResponse.questionnaire",
               "reason": "QuestionnaireResponse.text"}
DEFAULT_COUNT, MAX_COUNT = 50, 500
Q_PARAMS = ("url", "name", "status", "_count", "_offset", "_format")
QR_PARAMS = ("subject", "subject:identifier", "questionnaire", "status", "authored", "_lastUpdated", "_count",
             "_offset", "_format")


def fhir(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def _expression(e: dict[str, Any]) -> str:
    """FHIRPath of an error: given by the adapter, or mapped from the native API's location."""
    if e.get("expression"):
        return str(e["expression"])
    loc = [str(p) for p in e.get("loc", [])]
    if loc[:1] == ["answers"] and len(loc) > 1:
        return f"QuestionnaireResponse.item.where(linkId='{loc[1]}')"
    if loc and loc[0] in EXPRESSIONS:
        return EXPRESSIONS[loc[0]]
    return "QuestionnaireResponse"


def outcome(exc: DomainError) -> JSONResponse:
    issues = []
    for e in exc.errors or []:
        issues.append({"severity": "error", "code": ISSUE_CODES.get(e.get("code", ""), "invalid"),
                       "details": {"text": f"{e.get('code')}: {e.get('message')}"},
                       "expression": [_expression(e)]})
    if not issues:
        code = {401: "login", 403: "forbidden", 404: "not-found", 409: "conflict"}.get(exc.status_code, "invalid")
        issues.append({"severity": "error", "code": code, "details": {"text": exc.detail}})
    return fhir({"resourceType": "OperationOutcome", "issue": issues}, exc.status_code, exc.headers)


def _who(request: Request, session: Session, *roles: Role) -> Principal:
    principal = authenticate_now(request, session)
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


def _base(request: Request) -> str:
    return f"{str(request.base_url).rstrip('/')}/fhir"


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
            "url": f"{_base(request)}/Questionnaire/{qid}", "name": doc["key"],
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




# -- search parameters ------------------------------------------------------------------------------


def _lenient(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(p.strip().lower() == "handling=lenient" for p in prefer.split(";") + prefer.split(","))


def _params(request: Request, allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    """The search's (name, value) pairs. A parameter this server does not support is an error unless the
    client asked for lenient handling (FHIR search 3.2.1.1.5); then it is ignored and left out of `self`."""
    known: list[tuple[str, str]] = []
    unknown: list[tuple[str, str]] = []
    for name, value in request.query_params.multi_items():
        (known if name in allowed else unknown).append((name, value))
    if unknown and not _lenient(request):
        raise Malformed("unsupported search parameters", errors=[
            {"loc": [n], "code": "not-supported", "expression": n,
             "message": f"search parameter {n!r} is not supported (supported: {', '.join(allowed)}; send "
                        "'Prefer: handling=lenient' to have unknown parameters ignored)"} for n, _ in unknown])
    return known


def _values(params: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in params if n == name]


def _one(params: list[tuple[str, str]], name: str) -> str | None:
    values = _values(params, name)
    if len(values) > 1:
        raise Malformed(f"{name} is given more than once", errors=[
            {"loc": [name], "code": "structure", "expression": name, "message": "give it once"}])
    return values[0] if values else None


def _count(params: list[tuple[str, str]]) -> tuple[int, int]:
    def number(name: str, default: int, low: int, high: int) -> int:
        raw = _one(params, name)
        if raw is None:
            return default
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise Malformed(f"{name} must be an integer from {low} to {high}", errors=[
                {"loc": [name], "code": "value", "expression": name, "message": f"{raw!r} is not {low}..{high}"}])
        return int(raw)
    return number("_count", DEFAULT_COUNT, 0, MAX_COUNT), number("_offset", 0, 0, 10**9)


_PREFIX = re.compile(r"^(eq|ne|gt|lt|ge|le|sa|eb|ap)?(.+)$")


def _date_test(name: str, raw: str) -> Callable[[datetime], bool]:
    """A FHIR date search value (`ge2026-01-01`, `lt2026-11-30T10:00:00Z`) as a test on an instant: the value
    is a range as wide as its precision, compared as the specification describes for each prefix."""
    match = _PREFIX.match(raw)
    assert match is not None
    prefix, text = match.group(1) or "eq", match.group(2)
    try:
        if re.fullmatch(r"\d{4}", text):
            low = datetime(int(text), 1, 1, tzinfo=UTC)
            high = datetime(int(text) + 1, 1, 1, tzinfo=UTC)
        elif re.fullmatch(r"\d{4}-\d{2}", text):
            year, month = int(text[:4]), int(text[5:])
            low = datetime(year, month, 1, tzinfo=UTC)
            high = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        elif re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            low = datetime.fromisoformat(text).replace(tzinfo=UTC)
            high = low + timedelta(days=1)
        else:
            low = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if low.tzinfo is None:
                low = low.replace(tzinfo=UTC)
            high = low + timedelta(seconds=1)
    except ValueError:
        raise Malformed(f"{name}: {raw!r} is not a FHIR date", errors=[
            {"loc": [name], "code": "value", "expression": name,
             "message": f"{raw!r}: use [prefix]YYYY, YYYY-MM, YYYY-MM-DD or an instant with offset"}]) from None
    tests: dict[str, Callable[[datetime], bool]] = {
        "eq": lambda t: low <= t < high, "ne": lambda t: not low <= t < high, "gt": lambda t: t >= high,
        "ge": lambda t: t >= low, "lt": lambda t: t < low, "le": lambda t: t < high, "sa": lambda t: t >= high,
        "eb": lambda t: t < low, "ap": lambda t: low - timedelta(days=1) <= t < high + timedelta(days=1)}
    return tests[prefix]


def _bundle(request: Request, kept: list[tuple[str, str]], entries: list[dict[str, Any]], count: int,
            offset: int) -> JSONResponse:
    page = entries[offset:offset + count]
    path = f"{_base(request)}{request.url.path.removeprefix('/fhir')}"
    plain = [(n, v) for n, v in kept if n not in ("_count", "_offset")]

    def link(relation: str, at: int) -> dict[str, str]:
        query = urlencode([*plain, ("_count", str(count)), ("_offset", str(at))])
        return {"relation": relation, "url": f"{path}?{query}"}

    links = [link("self", offset)]
    if offset + count < len(entries) and count > 0:
        links.append(link("next", offset + count))
    if offset > 0:
        links.append(link("previous", max(0, offset - count)))
    body: dict[str, Any] = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "searchset",
                            "total": len(entries), "link": links}
    if page:
        body["entry"] = page
    return fhir(body)


# -- capability statement and questionnaires ------------------------------------------------------


@router.get("/metadata")
def capability_statement(request: Request) -> JSONResponse:
    """What this server does, exactly: no vread, history, update, delete, patch or conditional interactions."""
    def param(name: str, kind: str, doc: str) -> dict[str, str]:
        return {"name": name, "type": kind, "documentation": doc}

    common = [param("_count", "number", f"page size, at most {MAX_COUNT} (default {DEFAULT_COUNT}); pages follow "
                                        "the Bundle's next link")]
    return fhir({
        "resourceType": "CapabilityStatement", "status": "active", "date": "2026-11-30", "kind": "instance",
        "software": {"name": "cohort"}, "implementation": {"description": "cohort FHIR adapter",
                                                          "url": _base(request)},
        "fhirVersion": FHIR_VERSION, "format": ["json"],
        "rest": [{
            "mode": "server",
            "documentation": "Bearer tokens as in the native API. A search parameter not listed here is a 400 "
                             "OperationOutcome unless the request has 'Prefer: handling=lenient'. vread and "
                             "_history are not supported (resources are not versioned).",
            "security": {"description": "Authorization: Bearer <token> (cohort API token)"},
            "resource": [
                {"type": "Questionnaire", "versioning": "no-version", "readHistory": False,
                 "updateCreate": False, "conditionalCreate": False, "conditionalRead": "not-supported",
                 "conditionalUpdate": False, "conditionalDelete": "not-supported",
                 "interaction": [{"code": "read"}, {"code": "search-type"}],
                 "searchParam": [param("url", "uri", "the Questionnaire's canonical URL (exact)"),
                                 param("name", "string", "instrument key, starts with, case-insensitive"),
                                 param("status", "token", "always active"), *common]},
                {"type": "QuestionnaireResponse", "versioning": "no-version", "readHistory": False,
                 "updateCreate": False, "conditionalCreate": False, "conditionalRead": "not-supported",
                 "conditionalUpdate": False, "conditionalDelete": "not-supported",
                 "documentation": "One resource per (subject, wave, questionnaire). completed completes that "
                                  "instrument; in-progress saves it partial; amended corrects a completed one "
                                  f"(coordinators; reason in the extension {REASON_EXTENSION} or text).",
                 "interaction": [{"code": "read"}, {"code": "create"}, {"code": "search-type"}],
                 "searchParam": [
                     param("subject", "reference", "Patient/<external_id> (or the bare external_id); the "
                                                   ":identifier modifier takes [system|]external_id"),
                     param("questionnaire", "reference", "Questionnaire/<id>, its canonical URL or the bare id"),
                     param("status", "token", "completed, in-progress or amended (comma for any of them)"),
                     param("authored", "date", "with prefixes eq, ne, gt, ge, lt, le, sa, eb, ap"),
                     param("_lastUpdated", "date", "the response's last change, same prefixes"), *common]},
            ],
        }],
    })


def _visible_contexts(session: Session, principal: Principal, key: str | None = None) -> list[StudyContext]:
    keys = [key] if key is not None else repository.study_keys(session, principal.study_id)
    return [ctx for ctx in (studies.context(session, k, principal) for k in keys) if ctx.codebook is not None]


@router.get("/Questionnaire")
def search_questionnaires(request: Request, session: SessionDep) -> JSONResponse:
    try:
        principal = _who(request, session, "coordinator", "collector", "analyst")
        params = _params(request, Q_PARAMS)
        count, offset = _count(params)
        urls = {u.split("|")[0] for u in _values(params, "url")}
        names = [n.lower() for n in _values(params, "name")]
        wanted = {s for v in _values(params, "status") for s in v.split(",")}
        entries = []
        for ctx in _visible_contexts(session, principal):
            for doc in ctx.require_codebook().document["instruments"]:
                resource = questionnaire(request, ctx, doc)
                if urls and resource["url"] not in urls:
                    continue
                if names and not all(resource["name"].lower().startswith(n) for n in names):
                    continue
                if wanted and resource["status"] not in wanted:
                    continue
                entries.append({"fullUrl": f"{_base(request)}/Questionnaire/{resource['id']}", "resource": resource,
                                "search": {"mode": "match"}})
        return _bundle(request, params, entries, count, offset)
    except DomainError as exc:
        return outcome(exc)


@router.get("/Questionnaire/{questionnaire_id}")
def get_questionnaire(questionnaire_id: str, request: Request, session: SessionDep) -> JSONResponse:
    try:
        principal = _who(request, session, "coordinator", "collector", "analyst")
        ctx, doc = _instrument(session, principal, questionnaire_id)
        return fhir(questionnaire(request, ctx, doc))
    except DomainError as exc:
        return outcome(exc)


# -- responses ------------------------------------------------------------------------------------


def _json(body: bytes) -> Any:
    try:
        value = json.loads(body)
    except RecursionError:
        raise Malformed(f"the JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:
        raise Malformed("the body is not JSON") from None
    if parsed_depth(value) > MAX_JSON_DEPTH:
        raise Malformed(f"the JSON nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def _items(items: Any, path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every item with its FHIRPath, nested ones included; anything not shaped like an item is an error."""
    if not isinstance(items, list):
        raise Invalid("item must be an array", errors=[{"loc": [], "code": "structure", "expression": path,
                                                        "message": "an array of items"}])
    out = []
    for n, item in enumerate(items):
        here = f"{path}[{n}]"
        if not isinstance(item, dict):
            raise Invalid("every item must be an object", errors=[
                {"loc": [], "code": "structure", "expression": here, "message": "an item object"}])
        out.append((here, item))
        out += _items(item.get("item") or [], f"{here}.item")
        answers = item.get("answer")
        if isinstance(answers, list):
            for m, answer in enumerate(answers):
                if isinstance(answer, dict) and answer.get("item"):
                    out += _items(answer["item"], f"{here}.answer[{m}].item")
    return out


def _value(answer: Any) -> Any:
    if not isinstance(answer, dict):
        raise ValueError("an answer is an object with one value[x]")
    values = [(k, v) for k, v in answer.items() if k.startswith("value")]
    if len(values) != 1:
        raise ValueError("an answer has exactly one value[x]")
    key, value = values[0]
    if key == "valueCoding":
        if not isinstance(value, dict) or "code" not in value:
            raise ValueError("valueCoding needs a code")
        return value["code"]
    return value  # valueInteger, valueDecimal, valueBoolean, valueString, valueDate: typed by JSON


def answers_of(resource: dict[str, Any], codebook: Codebook, doc: dict[str, Any],
               paths: dict[str, str] | None = None) -> dict[str, Any]:
    """The answers of one instrument's QuestionnaireResponse, or Invalid naming each bad item by FHIRPath.
    `paths`, when given, receives each answered linkId's FHIRPath (for errors found later)."""
    answers: dict[str, Any] = {}
    errors = []
    own = {i["code"] for i in doc["items"]}
    for path, item in _items(resource.get("item") or [], "QuestionnaireResponse.item"):
        code = item.get("linkId")
        if not isinstance(code, str) or not code:
            errors.append({"loc": [], "code": "required", "expression": f"{path}.linkId", "message": "linkId"})
            continue
        if "answer" not in item:
            continue  # a group, or an item left unanswered
        given = item["answer"]
        if not isinstance(given, list) or not given:
            errors.append({"loc": ["answers", code], "code": "structure", "expression": f"{path}.answer",
                           "message": "answer must hold at least one answer (leave it out when unanswered)"})
            continue
        if code not in own:
            errors.append({"loc": ["answers", code], "code": "unknown_item", "expression": f"{path}.linkId",
                           "message": f"{code!r} is not an item of Questionnaire {doc['key']}"})
            continue
        try:
            values = [_value(a) for a in given]
        except ValueError as exc:
            errors.append({"loc": ["answers", code], "code": "type", "expression": f"{path}.answer",
                           "message": str(exc)})
            continue
        if paths is not None:
            paths[code] = f"{path}.answer"
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
    extensions = resource.get("extension") or []
    for n, ext in enumerate(extensions if isinstance(extensions, list) else []):
        if isinstance(ext, dict) and str(ext.get("url", "")).endswith("/StructureDefinition/wave"):
            value = ext.get("valueCode") or ext.get("valueString")
            if not isinstance(value, str) or not value:
                raise Invalid("the wave extension has no value", errors=[
                    {"loc": ["wave"], "code": "required", "expression": f"QuestionnaireResponse.extension[{n}]",
                     "message": "the wave extension needs a valueCode"}])
            return value
    based_on = resource.get("basedOn")
    for ref in based_on if isinstance(based_on, list) else []:
        value = _dig(ref, "identifier", "value")
        if value:
            return str(value)
    raise Invalid("name the wave", errors=[{"loc": ["wave"], "code": "required",
                                            "expression": "QuestionnaireResponse.extension",
                                            "message": f"an extension {WAVE_EXTENSION} (valueCode) or "
                                                       "basedOn.identifier"}])


def _reason(resource: dict[str, Any]) -> str | None:
    """Why a completed response is amended: the correction-reason extension, else the narrative's text."""
    extensions = resource.get("extension")
    for ext in extensions if isinstance(extensions, list) else []:
        if isinstance(ext, dict) and str(ext.get("url", "")).endswith("/StructureDefinition/correction-reason"):
            value = ext.get("valueString")
            if isinstance(value, str) and value.strip():
                return value.strip()
    div = _dig(resource, "text", "div")
    if isinstance(div, str):
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]*>", " ", div)).strip()
        return text or None
    return None


def response_id(row_id: uuid.UUID, instrument_key: str) -> str:
    return f"{row_id}-{instrument_key.replace('_', '.')}"


def _parse_response_id(resource_id: str) -> tuple[uuid.UUID, str]:
    try:
        return uuid.UUID(resource_id[:36]), resource_id[37:].replace(".", "_")
    except ValueError:
        raise NotFound(f"no QuestionnaireResponse {resource_id!r}") from None


def _instrument_doc(codebook: Codebook, key: str) -> dict[str, Any] | None:
    return next((d for d in codebook.document["instruments"] if d["key"] == key), None)


def response_resource(request: Request, ctx: StudyContext, row: StoredResponse, external_id: str,
                      doc: dict[str, Any], amended: bool = False) -> dict[str, Any]:
    """The QuestionnaireResponse of one instrument of a stored response."""
    codebook = ctx.require_codebook()
    state = responses.states_of(codebook, row).get(doc["key"], "not_started")
    items = []
    for item in doc["items"]:
        if item["code"] not in row.answers or row.answers[item["code"]] is None:
            continue
        value = row.answers[item["code"]]
        answers = [_answer_value(item, v) for v in (value if isinstance(value, list) else [value])]
        items.append({"linkId": item["code"], "answer": [{k.replace("answer", "value", 1): v for k, v in a.items()}
                                                         for a in answers]})
    at = row.updated_at
    if state == "complete":
        when = (row.completed_instruments or {}).get(doc["key"])
        at = datetime.fromisoformat(when) if when else (row.completed_at or row.updated_at)
    resource: dict[str, Any] = {
        "resourceType": "QuestionnaireResponse", "id": response_id(row.id, doc["key"]),
        "meta": {"lastUpdated": row.updated_at.astimezone(UTC).isoformat()},
        "extension": [{"url": WAVE_EXTENSION, "valueCode": row.wave}],
        "questionnaire": f"{_base(request)}/Questionnaire/{fhir_id(ctx, doc['key'])}",
        "status": ("amended" if amended else "completed") if state == "complete" else "in-progress",
        "subject": {"identifier": {"value": external_id}},
        "authored": at.astimezone(UTC).isoformat()}
    if items:
        resource["item"] = items
    return resource


def _amended(session: Session, row: StoredResponse, doc: dict[str, Any]) -> bool:
    changed = repository.corrected_items(session, [row.id]).get(row.id, set())
    return bool(changed & {i["code"] for i in doc["items"]})


def render_error(request: Request, exc: Exception) -> JSONResponse | None:
    """A domain error raised out of a FHIR route (through the request's transaction, which rolls
    back) as an OperationOutcome."""
    return outcome(exc) if isinstance(exc, DomainError) else None


@router.post("/QuestionnaireResponse")
async def post_response(request: Request, session: SessionDep) -> JSONResponse:
    from starlette.concurrency import run_in_threadpool

    resource = _json(await request.body())
    return await run_in_threadpool(_store, request, session, resource)


def _store(request: Request, session: Session, resource: Any) -> JSONResponse:
    if not isinstance(resource, dict) or resource.get("resourceType") != "QuestionnaireResponse":
        raise Invalid("expected a QuestionnaireResponse", errors=[
            {"loc": [], "code": "structure", "expression": "QuestionnaireResponse",
             "message": "resourceType must be QuestionnaireResponse"}])
    principal = _who(request, session, "coordinator", "collector")
    ctx, doc = _instrument(session, principal, _questionnaire_id(str(resource.get("questionnaire") or "")))
    external_id = _dig(resource, "subject", "identifier", "value")
    if not isinstance(external_id, str) or not external_id:
        raise Invalid("the subject is missing", errors=[
            {"loc": ["external_id"], "code": "required", "message": "subject.identifier.value: the external_id"}])
    status = resource.get("status")
    if status not in STATUSES:
        raise Invalid("unsupported status", errors=[{"loc": ["status"], "code": "option", "message":
                                                     "completed, amended or in-progress"}])
    codebook = ctx.require_codebook()
    wave = _wave(resource)
    paths: dict[str, str] = {}
    answers = answers_of(resource, codebook, doc, paths)
    authored = resource.get("authored")
    try:
        authored_at = datetime.fromisoformat(authored.replace("Z", "+00:00")) if isinstance(authored, str) else None
    except ValueError:
        raise Invalid("authored is not a dateTime", errors=[
            {"loc": ["completed_at"], "code": "type", "message": f"{authored!r} is not a FHIR dateTime"}]) from None
    existing = repository.response_of(session, ctx.study.id, external_id, wave, ctx.site_id)
    before = responses.states_of(codebook, existing).get(doc["key"]) if existing is not None else None
    headers = {}
    try:
        if status == "amended":
            row = _amend(session, ctx, principal, doc, existing, before, answers, resource)
        else:
            row = _submit(session, ctx, principal, doc, existing, before, answers, external_id, wave,
                          status == "completed", authored_at)
    except DomainError as exc:
        for e in exc.errors or []:  # the native API names items; point at them where they were posted
            loc = e.get("loc") or []
            if len(loc) > 1 and loc[0] == "answers" and str(loc[1]) in paths and not e.get("expression"):
                e["expression"] = paths[str(loc[1])]
        raise
    body = response_resource(request, ctx, row, external_id, doc, _amended(session, row, doc))
    headers["Location"] = f"/fhir/QuestionnaireResponse/{body['id']}"
    return fhir(body, 201 if before in (None, "not_started") else 200, headers)


def _submit(session: Session, ctx: StudyContext, principal: Principal, doc: dict[str, Any],
            existing: StoredResponse | None, before: str | None, answers: dict[str, Any], external_id: str,
            wave: str, completing: bool, authored_at: datetime | None) -> StoredResponse:
    if before == "complete" and existing is not None:
        if completing and all(existing.answers.get(k) == v for k, v in answers.items()):
            return existing  # the same completed resource again: nothing to do
        raise AlreadyComplete(f"Questionnaire {doc['key']} of {external_id!r} at {wave} is completed; a "
                              "coordinator corrects it by posting it with status amended")
    try:
        data = ResponseIn(external_id=external_id, wave=wave, status="partial", answers=answers,
                          complete_instruments=[doc["key"]] if completing else [],
                          completed_at=authored_at if completing else None)
    except ValidationError as exc:
        raise Invalid("the resource could not be read", errors=[
            {"loc": [str(e["loc"][0]) if e["loc"] else ""], "code": "type", "message": e["msg"]}
            for e in exc.errors()]) from None
    created, _ = responses.submit(session, ctx, data, principal, utcnow())
    row = session.get(StoredResponse, created.id)
    assert row is not None
    return row


def _amend(session: Session, ctx: StudyContext, principal: Principal, doc: dict[str, Any],
           existing: StoredResponse | None, before: str | None, answers: dict[str, Any],
           resource: dict[str, Any]) -> StoredResponse:
    if not principal.may("coordinator"):
        raise Forbidden(f"the {principal.role} role may not amend a completed response (coordinators correct)")
    if existing is None or before != "complete":
        raise Invalid("only a completed QuestionnaireResponse can be amended", errors=[
            {"loc": ["status"], "code": "rule", "message": "amended corrects a completed response; post "
                                                            "completed or in-progress first"}])
    reason = _reason(resource)
    if reason is None:
        raise Invalid("an amendment needs a reason", errors=[
            {"loc": ["reason"], "code": "required", "message": f"the reason in an extension {REASON_EXTENSION} "
                                                               "(valueString) or in text.div"}])
    own = {i["code"] for i in doc["items"]}
    change: dict[str, Any] = {k: v for k, v in answers.items() if existing.answers.get(k) != v}
    change |= {k: None for k in own if k in existing.answers and k not in answers}  # left out: removed
    if change:
        responses.correct(session, ctx, existing.id, CorrectionIn(answers=change, reason=reason[:2000]), principal,
                          utcnow())
    return existing


def _readable(session: Session, principal: Principal, row: StoredResponse) -> None:
    """Coordinators read every response of their study; a collector only what it submitted."""
    if principal.may("coordinator"):
        return
    if principal.role == "collector" and row.submitted_by == principal.token_id:
        return
    raise Forbidden(f"the {principal.role} role may not read this response")


@router.get("/QuestionnaireResponse/{resource_id}")
def read_response(resource_id: str, request: Request, session: SessionDep) -> JSONResponse:
    try:
        principal = _who(request, session, "coordinator", "collector")
        rid, key = _parse_response_id(resource_id)
        found = repository.response_with_id(session, rid)
        if found is None:
            raise NotFound(f"no QuestionnaireResponse {resource_id!r}")
        row, external_id, study_key = found
        ctx = studies.context(session, study_key, principal)
        doc = _instrument_doc(ctx.require_codebook(), key)
        if doc is None or responses.states_of(ctx.require_codebook(), row).get(key, "not_started") == "not_started":
            raise NotFound(f"no QuestionnaireResponse {resource_id!r}")
        if ctx.site_id is not None and repository.site_of_participant(session, row.participant_id) != ctx.site_id:
            raise NotFound(f"no QuestionnaireResponse {resource_id!r}")  # another site's: as if it did not exist
        _readable(session, principal, row)
        return fhir(response_resource(request, ctx, row, external_id, doc, _amended(session, row, doc)))
    except DomainError as exc:
        return outcome(exc)


@router.get("/QuestionnaireResponse")
def search_responses(request: Request, session: SessionDep) -> JSONResponse:
    try:
        principal = _who(request, session, "coordinator")
        params = _params(request, QR_PARAMS)
        count, offset = _count(params)
        subjects = {v.split("/")[-1] for v in _values(params, "subject")} | {
            v.split("|")[-1] for v in _values(params, "subject:identifier")}
        if len(subjects) > 1:
            return _bundle(request, params, [], count, offset)  # one subject cannot be two
        subject = next(iter(subjects), None)
        questionnaire_ref = _one(params, "questionnaire")
        wanted_doc: dict[str, Any] | None = None
        if questionnaire_ref:
            ctx, wanted_doc = _instrument(session, principal, _questionnaire_id(questionnaire_ref))
            contexts = [ctx]
        else:
            contexts = _visible_contexts(session, principal)
        statuses = {s for v in _values(params, "status") for s in v.split(",") if s}
        bad = statuses - set(STATUSES)
        if bad:
            raise Malformed("unknown status", errors=[
                {"loc": ["status"], "code": "value", "expression": "status",
                 "message": f"{', '.join(sorted(bad))}: use {', '.join(STATUSES)}"}])
        authored = [_date_test("authored", v) for v in _values(params, "authored")]
        updated = [_date_test("_lastUpdated", v) for v in _values(params, "_lastUpdated")]
        entries = []
        for ctx in contexts:
            codebook = ctx.require_codebook()
            docs = [wanted_doc] if wanted_doc is not None else codebook.document["instruments"]
            rows = repository.responses_with_ids(session, ctx.study.id, subject, site_id=ctx.site_id)
            corrected = repository.corrected_items(session, [r.id for r, _ in rows])
            for row, external_id in rows:
                if updated and not all(test(row.updated_at) for test in updated):
                    continue
                states = responses.states_of(codebook, row)
                for doc in docs:
                    if states.get(doc["key"], "not_started") == "not_started":
                        continue
                    amended = bool(corrected.get(row.id, set()) & {i["code"] for i in doc["items"]})
                    resource = response_resource(request, ctx, row, external_id, doc, amended)
                    if statuses and resource["status"] not in statuses:
                        continue
                    when = datetime.fromisoformat(resource["authored"])
                    if authored and not all(test(when) for test in authored):
                        continue
                    entries.append({"fullUrl": f"{_base(request)}/QuestionnaireResponse/{resource['id']}",
                                    "resource": resource, "search": {"mode": "match"}})
        return _bundle(request, params, entries, count, offset)
    except DomainError as exc:
        return outcome(exc)
