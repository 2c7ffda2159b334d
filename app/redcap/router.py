"""`POST /redcap/api/`: REDCap's API over a study, so PyCap, REDCapR and redcapAPI scripts work unchanged.

Requests are form-encoded with a 32-character token (create one with
`POST /api/v1/tokens {"role": ..., "study_key": ..., "format": "redcap"}`; the study is the
project). Success is 200; failure is 400 or 403 with `{"error": "..."}` (or a CSV body starting
`error:`), which is how REDCap clients detect errors. Imports go through the same validation
and audit as the native API and are all-or-nothing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from html import escape
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.core.crypto import settings_sealer
from app.core.db import Database, transaction
from app.core.errors import AlreadyComplete, DomainError
from app.core.inputs import MAX_JSON_DEPTH, parsed_depth
from app.core.security import Principal, Role, hash_secret
from app.core.settings import Settings
from app.core.timeutil import utcnow
from app.exports.service import neutralise
from app.participants import service as participants
from app.participants.schemas import SiteMoveIn
from app.redcap import logic, repository
from app.redcap.project import RECORD_ID, Project, event_name, wave_of
from app.responses import service as responses
from app.responses.schemas import ResponseIn
from app.sites import service as study_sites
from app.studies import service as studies
from app.studies.service import StudyContext
from app.tokens import repository as tokens

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

REDCAP_VERSION = "14.5.0"
ACTIONS = {"INSERT": "Created", "UPDATE": "Updated", "DELETE": "Deleted"}
BATCH = 500  # participants per read while streaming records


class RedcapError(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _error(fmt: str, exc: RedcapError) -> Response:
    """REDCap's error shapes: JSON `{"error": ..}`, CSV `error: ..`, else XML `<hash><error>..` (REDCap's
    default format, which PyCap checks for when a request names no format)."""
    if fmt == "csv":
        return PlainTextResponse(f"error: {exc.message}", status_code=exc.status)
    if fmt == "json":
        return JSONResponse({"error": exc.message}, status_code=exc.status)
    return Response(f'<?xml version="1.0" encoding="UTF-8" ?>\n<hash>\n  <error>{escape(exc.message)}</error>\n'
                    "</hash>\n", status_code=exc.status, media_type="text/xml")


class Form:
    """REDCap's request fields: arrays as `name[0]=..` (or comma-separated), booleans in any case."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.values: dict[str, str] = {}
        self.arrays: dict[str, list[tuple[int, str]]] = {}
        for key, value in items:
            if key.endswith("]") and "[" in key:
                name, _, index = key[:-1].partition("[")
                self.arrays.setdefault(name, []).append((int(index) if index.isdigit() else 0, value))
            else:
                self.values[key] = value

    def get(self, key: str, default: str = "") -> str:
        return self.values.get(key, default).strip()

    def list(self, key: str) -> list[str]:
        if key in self.arrays:
            return [v for _, v in sorted(self.arrays[key])]
        raw = self.get(key)
        return [v.strip() for v in raw.split(",") if v.strip()] if raw else []

    def flag(self, key: str, default: bool = False) -> bool:
        raw = self.get(key).lower()
        if raw == "":
            return default
        if raw in ("true", "1", "yes"):
            return True
        if raw in ("false", "0", "no"):
            return False
        raise RedcapError(f"{key} must be true or false, not {raw!r}")


@router.post("/redcap/api/")
async def redcap_api(request: Request) -> Response:
    try:
        items = (await request.form()).multi_items()
    except Exception as exc:  # a body the multipart/urlencoded parser refuses is the client's error
        return _error("json", RedcapError(f"the request body could not be read as a form: {exc}"))
    form = Form([(k, v) for k, v in items if isinstance(v, str)])
    fmt = (form.get("format") or "xml").lower()
    error_format = (form.get("returnFormat") or form.get("format") or "xml").lower()
    db: Database = request.app.state.db
    settings: Settings = request.app.state.settings
    try:
        return await run_in_threadpool(_handle, db, settings, form, fmt)
    except RedcapError as exc:
        return _error(error_format, exc)


def _principal(session: Session, secret: str) -> tuple[Principal, StudyContext]:
    if len(secret) != 32:
        raise RedcapError("You do not have permissions to use the API (the token must be 32 characters)", 403)
    row = tokens.principal_row(session, hash_secret(secret))  # also names the token as the audit actor
    if row is None:
        raise RedcapError("You do not have permissions to use the API", 403)
    principal = Principal(token_id=row.id, role=row.role, study_id=row.study_id, site_id=row.site_id)
    if principal.study_id is None:
        raise RedcapError("this token is not bound to a study (a REDCap project)", 403)
    key = repository.study_key(session, principal.study_id)
    assert key is not None
    # a token bound to a site is a REDCap user in that data access group: it sees that site's records only
    return principal, studies.context(session, key, principal)


def _allow(principal: Principal, *roles: Role) -> None:
    if not principal.may(*roles):
        raise RedcapError(f"the {principal.role} role may not use this part of the API", 403)


DESIGN = ("the study design (instruments, items, waves) is changed through cohort's API "
          "(POST /api/v1/studies with a codebook), not through REDCap's API")
# Contents REDCap has and this service does not; each answers as REDCap does when the feature is off.
EMPTY_WHEN_OFF = {  # content -> the header of its (empty) CSV export
    "repeatingFormsEvents": ["event_name", "form_name", "custom_form_label"],
    "dag": ["data_access_group_name", "unique_group_name", "data_access_group_id"],
    "userDagMapping": ["username", "redcap_data_access_group"],
}
REFUSED = {
    "user": ("REDCap users are not kept here: access is by cohort tokens (POST /api/v1/tokens)", 403),
    "userRole": ("REDCap user roles are not kept here: a cohort token has one role (POST /api/v1/tokens)", 403),
    "userRoleMapping": ("REDCap user roles are not kept here: a cohort token has one role (POST /api/v1/tokens)",
                        403),
    "report": ("this project has no reports: export records with fields, forms, events and filterLogic", 400),
    "generateNextRecordName": ("record auto-numbering is not enabled in this project: records are participants, "
                               "named by the external_id given at enrolment (POST /api/v1/studies/{key}/"
                               "participants)", 400),
    "fileRepository": ("the file repository is not enabled in this project", 400),
    "file": ("this project has no file upload fields", 400),
    "surveyQueueLink": ("the survey queue is not enabled in this project", 400),
    "surveyReturnCode": ("save and return later is not enabled in this project: the survey link (content=surveyLink)"
                         " resumes a started survey", 400),
    "surveyAccessCode": ("survey access codes are not used in this project: use content=surveyLink", 400),
    "pdf": ("PDF export is not enabled in this project", 400),
    "fieldValidation": ("this content is not supported", 400),
    "attachment": ("this project has no attachments", 400),
    "appRightsCheck": ("this content is not supported", 400),
}


def _project_id(ctx: StudyContext) -> int:
    """REDCap's integer project_id, stable for the study (derived from its id)."""
    return int(ctx.study.id.hex[:7], 16)


def _handle(db: Database, settings: Settings, form: Form, fmt: str) -> Response:
    content = form.get("content")
    action = (form.get("action") or "export").lower()
    with transaction(db) as session:
        principal, ctx = _principal(session, form.get("token"))
        if content == "version":
            return PlainTextResponse(REDCAP_VERSION)
        if content in REFUSED:
            message, status = REFUSED[content]
            raise RedcapError(f"{content}: {message}", status)
        if action not in ("export", "import", "delete", "switch"):
            raise RedcapError(f"action {action!r} is not one of export, import, delete")
        writes = "data" in form.values or action in ("import", "delete", "switch")
        # An import's format is its data's, checked when read; a survey link is plain text whatever the format.
        if fmt not in ("json", "csv") and not writes and content != "surveyLink":
            raise RedcapError(f"format={fmt} is not supported: use format=json or format=csv")
        raw_cells = form.flag("raw_cells")
        project = Project(ctx.require_codebook())
        if content in ("metadata", "arm", "event", "formEventMapping", "project", "project_settings",
                       "instrument") and writes:
            raise RedcapError(DESIGN, 403)
        if content == "dag" and writes:
            raise RedcapError("dag: data access groups are the study's sites; they are added through cohort's API "
                              "(POST /api/v1/studies/{key}/sites), not through REDCap's")
        if content == "dag":
            return _rows(fmt, _dags(session, ctx), raw_cells=raw_cells) if fmt == "json" else PlainTextResponse(
                _csv(_dags(session, ctx), EMPTY_WHEN_OFF["dag"], raw_cells=raw_cells), media_type="text/csv")
        if content in EMPTY_WHEN_OFF:
            if writes:
                what = "repeating instruments or events" if content == "repeatingFormsEvents" else "data access groups"
                raise RedcapError(f"{content}: this project has no {what}, and they cannot be added through the API")
            return JSONResponse([]) if fmt == "json" else PlainTextResponse(
                _csv([], EMPTY_WHEN_OFF[content]), media_type="text/csv")
        if content == "project":
            return _rows(fmt, [{
                "project_id": _project_id(ctx), "project_title": ctx.study.name, "creation_time":
                ctx.study.created_at.strftime("%Y-%m-%d %H:%M:%S"), "in_production": 1, "project_language": "English",
                "purpose": 2, "is_longitudinal": 1, "has_repeating_instruments_or_events": 0,
                "surveys_enabled": 1, "record_autonumbering_enabled": 0, "project_notes": "",
                "display_today_now_button": 1, "missing_data_codes": "", "secondary_unique_field": "",
            }], single=True, raw_cells=raw_cells)
        if content == "metadata":
            fields, forms = form.list("fields"), form.list("forms")
            unknown = sorted({f for f in fields if f not in project.by_name and f != RECORD_ID} |
                             (set(forms) - set(dict(project.forms))))
            if unknown:
                raise RedcapError(f"The following values are not valid fields or forms: {', '.join(unknown)}")
            rows = [r for r in project.metadata()
                    if (not fields and not forms) or r["field_name"] in fields or r["form_name"] in forms]
            return _rows(fmt, rows, raw_cells=raw_cells)
        if content == "instrument":
            return _rows(fmt, [{"instrument_name": k, "instrument_label": label} for k, label in project.forms],
                         raw_cells=raw_cells)
        if content == "arm":
            return _rows(fmt, [{"arm_num": 1, "name": "Arm 1"}], raw_cells=raw_cells)
        if content == "event":
            return _rows(fmt, project.events(), raw_cells=raw_cells)
        if content == "formEventMapping":
            return _rows(fmt, project.form_event_mapping(), raw_cells=raw_cells)
        if content == "exportFieldNames":
            return _rows(fmt, project.export_field_names(form.get("field") or None), raw_cells=raw_cells)
        if content == "record":
            if action == "delete":
                raise RedcapError("records are not deleted through the REDCap API of this service (you do not have "
                                  "Delete Record privileges): a coordinator withdraws a participant, erasing contact "
                                  "data, with POST /api/v1/studies/{key}/participants/{external_id}/withdraw", 403)
            if writes:
                _allow(principal, "coordinator", "collector")
                if "data" not in form.values:
                    raise RedcapError("import records: the data parameter is missing")
                reply = (form.get("returnFormat") or "json").lower()
                return _import(session, ctx, project, principal, form, "csv" if reply == "csv" else "json")
            _allow(principal, "coordinator", "analyst")
        elif content == "log":
            _allow(principal, "coordinator")
            if principal.sited:
                raise RedcapError("the log spans every data access group: a token bound to one may not export it",
                                  403)
            return _rows(fmt, _log(session, ctx, form), raw_cells=raw_cells)
        elif content in ("participantList", "surveyLink"):
            _allow(principal, "coordinator")
            return _survey(session, settings, ctx, project, form, fmt, content)
        else:
            raise RedcapError(f"content {content!r} is not supported by this service")
        names = None
        if principal.role == "analyst":  # analysts never see external ids: records are pseudonyms
            names = studies.pseudonymiser(session, ctx.study, settings_sealer(settings))
        study_id = ctx.study.id
    return _export(db, study_id, project, form, fmt, names, site_id=ctx.site_id)


def _rows(fmt: str, rows: list[dict[str, Any]], *, single: bool = False, raw_cells: bool = False) -> Response:
    if fmt == "json":
        return JSONResponse(rows[0] if single else rows)
    return PlainTextResponse(_csv(rows, list(rows[0]) if rows else [], raw_cells=raw_cells), media_type="text/csv")


def _csv(rows: list[dict[str, Any]], header: list[str], *, with_header: bool = True, raw_cells: bool = False) -> str:
    """RFC 4180 through the csv module: CRLF line ends, so a value holding a bare CR or LF is quoted."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    if with_header:
        writer.writerow(header)
    for row in rows:
        writer.writerow([row.get(c, "") if raw_cells else _safe(row.get(c, "")) for c in header])
    return buffer.getvalue()


def _line(cells: list[str], raw_cells: bool) -> str:
    return _csv([dict(zip(cells, cells, strict=True))], cells, with_header=False, raw_cells=raw_cells)


# -- record export ---------------------------------------------------------------------------------


def _export(db: Database, study_id: Any, project: Project, form: Form, fmt: str, names: Any, *,
            site_id: Any = None) -> Response:
    record_type = (form.get("type") or "flat").lower()
    if record_type not in ("flat", "eav"):
        raise RedcapError("type must be flat or eav")
    labels = _choice(form, "rawOrLabel", ("raw", "label")) == "label"
    label_headers = _choice(form, "rawOrLabelHeaders", ("raw", "label")) == "label"
    checkbox_labels = form.flag("exportCheckboxLabel")
    survey = form.flag("exportSurveyFields")
    groups = form.flag("exportDataAccessGroups")
    raw_cells = form.flag("raw_cells")
    wanted = set(form.list("fields"))
    forms = set(form.list("forms"))
    unknown = [f for f in wanted if f != RECORD_ID and f not in project.by_name
               and f.removesuffix("_complete") not in dict(project.forms)]
    if unknown:
        raise RedcapError(f"The following values in the parameter \"fields\" are not valid: {', '.join(unknown)}")
    unknown_forms = sorted(forms - set(dict(project.forms)))
    if unknown_forms:
        raise RedcapError(f"The following values in the parameter \"forms\" are not valid: {', '.join(unknown_forms)}")
    wanted |= {f.name for f in project.fields if f.form in forms} | {
        f.name for f in project.fields if f"{f.form}_complete" in wanted}
    fields = [f for f in project.fields if not wanted or f.name in wanted]
    events = form.list("events")
    bad_events = [e for e in events if wave_of(e) not in project.codebook.wave_keys]
    if bad_events:
        raise RedcapError(f"The following events are not valid: {', '.join(bad_events)}")
    waves = {wave_of(e) for e in events}
    records = set(form.list("records"))
    logic_text = form.get("filterLogic")
    try:
        condition = logic.parse(logic_text, project.logic_schema()) if logic_text else None
    except logic.LogicError as exc:
        raise RedcapError(f"filterLogic could not be parsed: {exc}") from None
    begin, end = _instant(form, "dateRangeBegin"), _instant(form, "dateRangeEnd")
    extra = (["redcap_data_access_group"] if groups else []) + (["redcap_survey_identifier"] if survey else [])
    columns = [RECORD_ID, "redcap_event_name", *extra, *project.columns(fields, survey=survey)]
    order = {w: i for i, w in enumerate(project.codebook.wave_keys)}

    def record_rows(record: str, stored: list[Any]) -> Iterator[dict[str, str]]:
        statuses = {r.wave: project.form_statuses(r.wave, r.answers, r.status, r.completed_instruments or {})
                    for r in stored}
        raw: dict[str, dict[str, str]] = {}
        if condition is not None:
            raw = {r.wave: project.flat_row(record, r.wave, r.answers, statuses[r.wave], project.fields, False)
                   for r in stored}
        for r in stored:
            if waves and r.wave not in waves:
                continue
            if condition is not None:
                def lookup(event: str | None, column: str, wave: str = r.wave) -> str:
                    row = raw.get(wave if event is None else wave_of(event) or "")
                    return row.get(column, "") if row is not None else ""
                if not logic.matches(condition, lookup):
                    continue
            stamps = None
            if survey:
                stamps = {f: _stamp((r.completed_instruments or {}).get(f), r.completed_at)
                          for f, s in statuses[r.wave].items() if s == "2"}
            row = project.flat_row(record, r.wave, r.answers, statuses[r.wave], fields, labels,
                                   checkbox_labels=checkbox_labels, survey=stamps)
            if extra:
                row = {RECORD_ID: row[RECORD_ID], "redcap_event_name": row["redcap_event_name"],
                       **dict.fromkeys(extra, ""), **row}
                if groups:
                    row["redcap_data_access_group"] = r.site or ""
            yield row

    def rows() -> Iterator[dict[str, str]]:
        after = ""
        while True:
            with transaction(db) as session:
                batch = repository.responses_after(session, study_id, after, BATCH,
                                                   records if names is None else None, site_id)
                last = repository.last_of_page(session, study_id, after, BATCH, site_id)
            by_record: dict[str, list[Any]] = {}
            for r in batch:
                by_record.setdefault(r.external_id, []).append(r)
            for ext in sorted(by_record):
                stored = sorted(by_record[ext], key=lambda r: order.get(r.wave, 99))
                record = names(ext) if names is not None else ext
                if records and record not in records:
                    continue
                changed = max(r.updated_at for r in stored)
                if (begin is not None and changed < begin) or (end is not None and changed > end):
                    continue  # REDCap's date range is on the record's last change
                yield from record_rows(record, stored)
            if last is None:
                return
            after = last

    def body() -> Iterator[str]:
        if record_type == "eav":
            eav = ({"record": r[RECORD_ID], "redcap_event_name": r["redcap_event_name"], "field_name": k, "value": v}
                   for r in rows() for k, v in r.items() if k not in (RECORD_ID, "redcap_event_name") and v != "")
            yield from _stream(fmt, eav, ["record", "redcap_event_name", "field_name", "value"], raw_cells)
        else:
            header = None
            if label_headers:
                names_of = project.header_labels()
                header = [names_of.get(c, c) for c in columns]
            yield from _stream(fmt, rows(), columns, raw_cells, header)

    media = "application/json" if fmt == "json" else "text/csv"
    return StreamingResponse(body(), media_type=media)


def _choice(form: Form, key: str, allowed: tuple[str, ...]) -> str:
    value = (form.get(key) or allowed[0]).lower()
    if value not in allowed:
        raise RedcapError(f"{key} must be {' or '.join(allowed)}, not {value!r}")
    return value


def _instant(form: Form, key: str) -> datetime | None:
    """REDCap's `YYYY-MM-DD HH:MM:SS` (a date alone is its midnight), read as UTC."""
    text = form.get(key)
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise RedcapError(f"{key} must be YYYY-MM-DD HH:MM:SS, not {text!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _stamp(instrument_at: str | None, completed_at: datetime | None) -> str:
    """`<form>_timestamp`: when that instrument was completed (else when the response was), in UTC."""
    at = completed_at
    if instrument_at:
        try:
            at = datetime.fromisoformat(instrument_at)
        except ValueError:
            at = completed_at
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if at is not None else ""


def _safe(value: Any) -> Any:
    """A REDCap CSV cell made inert for spreadsheets (every value there is text, so plain numbers stay)."""
    return neutralise(value, numbers_are_data=True)


def _stream(fmt: str, rows: Iterator[dict[str, str]], columns: list[str], raw_cells: bool = False,
            header: list[str] | None = None) -> Iterator[str]:
    if fmt == "json":
        yield "["
        first = True
        for row in rows:
            yield ("" if first else ",") + json.dumps(row)
            first = False
        yield "]"
        return
    yield _line(header or columns, raw_cells)
    chunk: list[dict[str, str]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= 200:
            yield _csv(chunk, columns, with_header=False, raw_cells=raw_cells)
            chunk = []
    if chunk:
        yield _csv(chunk, columns, with_header=False, raw_cells=raw_cells)


# -- record import ---------------------------------------------------------------------------------




def _parse(data: str, fmt: str) -> list[dict[str, Any]]:
    if fmt not in ("json", "csv"):
        raise RedcapError(f"format={fmt} is not supported for imports: use json or csv")
    try:
        if fmt == "json":
            parsed = json.loads(data)
            if parsed_depth(parsed) > MAX_JSON_DEPTH:
                raise RedcapError(f"data nests deeper than {MAX_JSON_DEPTH} levels")
            if not isinstance(parsed, list) or not all(isinstance(r, dict) for r in parsed):
                raise RedcapError("data must be a JSON array of records")
            return parsed
        rows = list(csv.DictReader(io.StringIO(data, newline="")))
    except RecursionError:
        raise RedcapError(f"data nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, csv.Error) as exc:
        raise RedcapError(f"the data could not be parsed as {fmt}: {exc}") from None
    for n, row in enumerate(rows, start=1):
        if None in row:
            raise RedcapError(f"row {n} of the CSV data has more cells than its header has columns")
    return rows


def _import(session: Session, ctx: StudyContext, project: Project, principal: Principal, form: Form,
            fmt: str) -> Response:
    import_format = (form.get("format") or "json").lower()
    if form.flag("forceAutoNumber"):
        raise RedcapError("forceAutoNumber is not supported: records are participants enrolled through "
                          "POST /api/v1/studies/{key}/participants, named by their external_id")
    rows = _parse(form.values["data"], import_format)
    overwrite = (form.get("overwriteBehavior") or "normal").lower()
    if overwrite not in ("normal", "overwrite"):
        raise RedcapError("overwriteBehavior must be normal or overwrite")
    return_content = (form.get("returnContent") or "count").lower()
    grouped: dict[tuple[str, str], dict[str, Any]] = {}
    problems: list[str] = []
    dags: dict[str, str] = {}
    for n, row in enumerate(rows, start=1):
        record = str(row.get(RECORD_ID) or "").strip()
        dag = str(row.pop("redcap_data_access_group", None) or "").strip()
        if dag and record and dags.setdefault(record, dag) != dag:
            problems.append(f"row {n} ({record}): redcap_data_access_group {dag!r} differs from "
                            f"{dags[record]!r} given for the same record")
        event = str(row.get("redcap_event_name") or "").strip()
        wave = wave_of(event)
        if not record:
            problems.append(f"row {n}: {RECORD_ID} is missing")
            continue
        if wave is None or wave not in project.codebook.wave_keys:
            problems.append(f"row {n} ({record}): redcap_event_name {event!r} is not an event of this project")
            continue
        grouped.setdefault((record, wave), {}).update({k: v for k, v in row.items() if v not in (None, "")})
    now = utcnow()
    imported: list[str] = []
    for (record, wave), row in grouped.items():
        if record in dags and set(row) <= {RECORD_ID, "redcap_event_name"}:
            continue  # only a data access group for the record: nothing to store at this event
        answers, bad = project.answers_from(row)
        problems += [f"{record} ({event_name(wave)}): {p}" for p in bad]
        if bad:
            continue
        flags, bad = project.complete_flags(row, wave)
        problems += [f"{record} ({event_name(wave)}): {p}" for p in bad]
        if bad:
            continue
        # Forms complete one at a time (contract section 5): `<form>_complete = 2` completes that instrument;
        # the response completes when all its instruments are. 0 or 1 saves the form as started.
        done = repository.completed_forms(session, ctx.study.id, record, wave, ctx.site_id) or set()
        reopened = [f for f, flag in flags.items() if flag != "2" and (f in done or "*" in done)]
        if reopened:
            problems += [f"{record} ({event_name(wave)}): {f}_complete: the form is complete; a coordinator "
                         "corrects it with PATCH /api/v1/studies/{key}/responses/{id}" for f in reopened]
            continue
        completing = [f for f in project.forms_at(wave) if flags.get(f) == "2"]
        try:
            with session.begin_nested():
                responses.submit(session, ctx, ResponseIn(external_id=record, wave=wave, status="partial",
                                                          complete_instruments=completing, answers=answers),
                                 principal, now)
        except AlreadyComplete:
            stored = repository.stored_answers(session, ctx.study.id, record, wave, ctx.site_id)
            if stored is None or any(stored.get(k) != v for k, v in answers.items()):
                problems.append(f"{record} ({event_name(wave)}): the response is complete; a coordinator "
                                "corrects it with PATCH /api/v1/studies/{key}/responses/{id}")
                continue
        except DomainError as exc:
            detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:] or e['loc'])}: {e['message']} ({e['code']})"
                               for e in exc.errors or []) or exc.detail
            problems.append(f"{record} ({event_name(wave)}): {detail}")
            continue
        imported.append(record)
    problems += _assign_dags(session, ctx, principal, dags, now)
    imported += list(dags)
    if problems:  # all or nothing: the error rolls the import's transaction back
        raise RedcapError("; ".join(problems[:50]) + (f" (and {len(problems) - 50} more)" if len(problems) > 50
                                                       else ""))
    ids = list(dict.fromkeys(imported))
    if return_content == "ids":
        return _rows(fmt, [{"id": i} for i in ids]) if fmt == "csv" else JSONResponse(ids)
    if return_content == "nothing":
        return PlainTextResponse("")
    return JSONResponse({"count": len(ids)}) if fmt == "json" else PlainTextResponse(f"count\n{len(ids)}\n")


def _assign_dags(session: Session, ctx: StudyContext, principal: Principal, dags: dict[str, str],
                 now: datetime) -> list[str]:
    """`redcap_data_access_group` on import: the record moves to that site (audited, with the import as
    its reason). A token bound to a site is a user in that DAG: it may name only its own."""
    problems = []
    sites = {s.key: s for s in study_sites.of_study(session, ctx.study.id)}
    may_move = ctx.site_id is None and principal.may("coordinator")  # as POST .../participants/{id}/move
    for record, dag in dags.items():
        site = sites.get(dag)
        if site is None or (ctx.site_id is not None and site.id != ctx.site_id):
            # one message for an unknown group and another site's, so site keys cannot be probed
            problems.append(f"{record}: redcap_data_access_group {dag!r} is not a data access group of this "
                            "project you may assign records to")
            continue
        try:
            participant = participants.find(session, ctx, record)
        except DomainError:
            problems.append(f"{record}: the record does not exist (records are enrolled through cohort's API)")
            continue
        if participant.site_id != site.id and not may_move:
            problems.append(f"{record}: moving a record to another data access group takes a coordinator's "
                            "token for the whole project")
            continue
        if participant.site_id != site.id:
            participants.move(session, ctx, record, SiteMoveIn(
                site=dag, reason="REDCap record import (redcap_data_access_group)"), principal.token_id, now)
    return problems


# -- surveys and the log ----------------------------------------------------------------------------


def _dags(session: Session, ctx: StudyContext) -> list[dict[str, Any]]:
    """The study's sites as REDCap data access groups (a token bound to a site sees its own)."""
    return [{"data_access_group_name": s.name, "unique_group_name": s.key,
             "data_access_group_id": int(s.id.hex[:7], 16)}
            for s in study_sites.of_study(session, ctx.study.id) if ctx.site_id in (None, s.id)]


def _survey(session: Session, settings: Settings, ctx: StudyContext, project: Project, form: Form, fmt: str,
            content: str) -> Response:
    from app.participants import repository as participants_repo
    from app.reminders.links import LinkTarget, link_for, make_token

    instrument, event = form.get("instrument"), form.get("event")
    wave = wave_of(event)
    if instrument not in dict(project.forms):
        raise RedcapError(f"instrument {instrument!r} is not a form of this project")
    if wave is None or wave not in project.codebook.wave_keys or wave not in project.form_waves[instrument]:
        raise RedcapError(f"event {event!r} is not an event of form {instrument!r}")
    found = repository.wave_windows(session, ctx.study.id, wave,
                                    form.get("record") if content == "surveyLink" else None, ctx.site_id)
    if content == "surveyLink":
        if not found:
            raise RedcapError(f"record {form.get('record')!r} does not exist")
        pid, ext, closes_at, _ = found[0]
        token = make_token(settings.secret(), LinkTarget(ctx.study.key, str(pid), wave, closes_at))
        return PlainTextResponse(link_for(settings.survey_url, token))
    sealer = settings_sealer(settings)
    sealed = participants_repo.sealed_contacts(session, [r[0] for r in found])
    rows = []
    for pid, ext, _, completed_at in found:
        contact = sealer.open(sealed[pid]) if pid in sealed else {}
        rows.append({"email": contact.get("email") or "", "email_occurrence": 1, "identifier": "",
                     "invitation_sent_status": 0, "invitation_send_time": "",
                     "response_status": 2 if completed_at else 0, "survey_access_code": "", "survey_link": "",
                     "survey_queue_link": "", "record": ext})
    return _rows(fmt, rows)


LOG_TYPES: dict[str, tuple[tuple[str, ...] | None, tuple[str, ...] | None]] = {  # logtype -> (tables, actions)
    "record": (("participants", "responses"), None),
    "record_add": (("participants", "responses"), ("INSERT",)),
    "record_edit": (("participants", "responses"), ("UPDATE",)),
    "record_delete": (("participants", "responses"), ("DELETE",)),
    "user": (("api_tokens",), None),
    "manage": (("studies", "codebooks", "schedules"), None),
    "export": ((), None),  # exports are not audited here
    "lock_record": ((), None),  # records are never locked here
    "page_view": ((), None),
}


def _log(session: Session, ctx: StudyContext, form: Form) -> list[dict[str, Any]]:
    """The audit trail as REDCap's log, filtered by record, logtype, user, beginTime and endTime."""
    logtype = form.get("logtype")
    if logtype and logtype not in LOG_TYPES:
        raise RedcapError(f"logtype must be one of {', '.join(LOG_TYPES)}, not {logtype!r}")
    tables, actions = LOG_TYPES.get(logtype, (None, None))
    record = form.get("record")
    project = Project(ctx.require_codebook())
    names = repository.external_ids(session, ctx.study.id)
    rows = []
    for e in repository.audit_entries(session, ctx.study.id, tables=tables, actions=actions,
                                      actor=form.get("user") or None, begin=_instant(form, "beginTime"),
                                      end=_instant(form, "endTime")):
        after = e.after or e.before or {}
        verb = ACTIONS.get(e.action, e.action)
        details = ", ".join(sorted(e.changed)) if e.changed else ""
        name = ""
        if e.table_name == "participants":
            name = str(after.get("external_id") or names.get(e.row_id, ""))
            text = f"{verb} Record {name} (participant)"
        elif e.table_name == "responses":
            name = names.get(str(after.get("participant_id")), "")
            wave = str(after.get("wave") or "")
            changed = set((e.after or {}).get("answers") or {}) ^ set((e.before or {}).get("answers") or {}) | {
                k for k, v in ((e.after or {}).get("answers") or {}).items()
                if ((e.before or {}).get("answers") or {}).get(k) != v}
            forms = [f for f, _ in project.forms if any(x.form == f and x.name in changed for x in project.fields)]
            text = f"{verb} Record {name}, event {event_name(wave)}" + (f", forms {', '.join(forms)}" if forms else "")
            details = ", ".join(sorted(changed)) or details
        else:
            text = f"{verb} {e.table_name} {e.row_id}"
        if record and name != record:
            continue
        rows.append({"timestamp": e.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M"), "username": e.actor or "system",
                     "action": text, "details": details, "record": name})
    return rows
