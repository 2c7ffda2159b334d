"""The survey link, GET/POST /s/{token}: the participant's survey pages, or JSON for a front-end.

Browsers (Accept: text/html) get server-rendered pages that work without scripts; a small
same-origin script only shows and hides conditional items as answers change. Pages carry a
strict Content-Security-Policy (no inline code), are never framed or cached, and send no referrer.
"""

from __future__ import annotations

import json
from datetime import date
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.orm import Session

from app.core.crypto import all_secrets
from app.core.db import SessionDep, remember_actor
from app.core.deps import SettingsDep
from app.core.errors import Gone, Invalid, NotFound
from app.core.settings import Settings
from app.core.timeutil import utcnow
from app.reminders.schemas import LinkResolved
from app.studies import service as studies
from app.studies.models import Study
from app.survey import service
from app.survey.i18n import words
from app.survey.service import LinkUnknown, Page, Question, Survey, SurveyClosed

router = APIRouter(tags=["survey"])

templates = Environment(loader=PackageLoader("app", "templates"), autoescape=select_autoescape(["html"]))
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_ASSETS = {"survey.css": "text/css; charset=utf-8", "survey.js": "text/javascript; charset=utf-8"}
TokenPath = Annotated[str, Path(max_length=2000)]


def _wants_html(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "text/html" in accept and not accept.lstrip().startswith("application/json")


def _html(name: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    language = values.get("language", "en")
    html = templates.get_template(f"survey/{name}").render(w=words(language), **values)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def _study_values(study: Study | None) -> dict[str, Any]:
    if study is None:
        return {"language": "en", "study_name": None, "contact": None}
    settings = study.settings or {}
    return {"language": studies.survey_language(study), "study_name": study.name,
            "contact": settings.get("contact") or None}


def _not_found_page() -> HTMLResponse:
    return _html("message.html", 404, title_key="not_found_title", text=words("en")["not_found"],
                 **_study_values(None))


def _closed_page(exc: SurveyClosed) -> HTMLResponse:
    values = _study_values(exc.study)
    w = words(values["language"])
    if exc.reason == "complete":
        return _html("message.html", 410, title_key="thanks_title", text=w["already"], **values)
    if exc.reason == "window" and exc.closed_on is not None:
        text = w["window_closed"].format(date=_long_date(exc.closed_on, values["language"]))
        return _html("message.html", 410, title_key="closed_title", text=text, closed_on=exc.closed_on, **values)
    return _html("message.html", 410, title_key="closed_title", text=w["closed"], **values)


_MONTHS = {"en": ("January", "February", "March", "April", "May", "June", "July", "August", "September",
                  "October", "November", "December"),
           "es": ("enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre",
                  "octubre", "noviembre", "diciembre")}


def _long_date(day: date, language: str) -> str:
    month = _MONTHS.get(language, _MONTHS["en"])[day.month - 1]
    return f"{day.day} de {month} de {day.year}" if language == "es" else f"{day.day} {month} {day.year}"


def _json_problem(exc: LinkUnknown | SurveyClosed) -> Exception:
    if isinstance(exc, LinkUnknown):
        return NotFound("not a survey link this service issued")
    if exc.reason == "complete":
        return Gone("the answers for this link have been received; the link is closed")
    if exc.reason == "window":
        return Gone(f"this survey closed on {exc.closed_on}")
    return Gone("this survey is closed")


def _open(session: Session, settings: Settings, token: str) -> Survey:
    secrets = all_secrets(settings)
    target, _ = service.read_link(secrets, token, utcnow())
    remember_actor(session, service.link_actor(target))  # before the first query opens the transaction
    return service.open_survey(session, secrets, token, utcnow(), words)


def _display(question: Question, value: Any) -> Any:
    """A stored answer as the form shows it."""
    if value is None:
        return [] if question.type == "multi_choice" else ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value)


def _first_input(question: Question) -> str:
    """The id of the field an error summary entry leads to."""
    choices = ("single_choice", "multi_choice", "boolean")
    return f"q-{question.code}-0" if question.type in choices else f"q-{question.code}-input"


def _page(survey: Survey, page: Page, settings: Settings, *, raw: dict[str, Any] | None = None,
          answers: dict[str, Any] | None = None, errors: list[dict[str, Any]] | None = None,
          notice: str | None = None, status_code: int = 200) -> HTMLResponse:
    current = {**survey.answers, **(answers or {})}
    on_page = {q.code for q in page.questions}
    by_item: dict[str, str] = {}
    for e in errors or []:
        loc = e.get("loc") or []
        if len(loc) == 2 and loc[0] == "answers":
            by_item.setdefault(str(loc[1]), str(e["message"]))
    questions = []
    for q in page.questions:
        cond = q.enable_when
        questions.append({
            "q": q,
            "value": raw[q.code] if raw is not None and q.code in raw else _display(q, survey.answers.get(q.code)),
            "hidden": not service.visible(q, current),
            "when": json.dumps({"item": cond.item, "op": cond.operator, "value": cond.value})
            if cond is not None and cond.item in on_page else None,
            "error": by_item.get(q.code),
        })
    asked = {q.code: q for p in survey.pages for q in p.questions}
    summary = [{"code": code, "label": asked[code].label if code in asked else code, "message": message,
                "anchor": code in on_page, "target": _first_input(asked[code]) if code in asked else ""}
               for code, message in by_item.items()]
    return _html("page.html", status_code, survey=survey, page=page, questions=questions, summary=summary,
                 notice=notice, total=len(survey.pages), token=survey.token,
                 csrf=service.csrf_value(settings.secret(), survey.token), language=survey.language,
                 study_name=survey.study_name, contact=survey.contact)


@router.get("/s/static/{name}", include_in_schema=False)
def asset(name: Annotated[str, Path(max_length=40)]) -> Response:
    if name not in _ASSETS:
        raise NotFound("no such file")
    body = resources.files("app.survey").joinpath("static", name).read_bytes()
    return Response(body, media_type=_ASSETS[name],
                    headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=3600"})


@router.get("/s/{token}", response_model=LinkResolved,
            summary="A participant's survey link: the survey pages (text/html) or the link's target (JSON)",
            description="Browsers (`Accept: text/html`) get the wave's survey, page by page; other clients get "
                        "the link's target for their own front-end. 404 for a link this service did not issue; "
                        "410 once the wave is complete, the participant has withdrawn or the window has closed.",
            responses={200: {"content": {"text/html": {}}}, 404: {"description": "not a link this service issued"},
                       410: {"description": "complete, withdrawn or closed"}})
def open_link(token: TokenPath, request: Request, session: SessionDep, settings: SettingsDep,
              page: Annotated[int | None, Query(ge=1, le=1000)] = None, more: bool = False) -> Any:
    html = _wants_html(request)
    try:
        survey = _open(session, settings, token)
    except LinkUnknown as exc:
        if html:
            return _not_found_page()
        raise _json_problem(exc) from None
    except SurveyClosed as exc:
        if html:
            return _closed_page(exc)
        raise _json_problem(exc) from None
    if not html:
        return JSONResponse(LinkResolved(
            study=survey.ctx.study.key, external_id=survey.participant.external_id, wave=survey.target.wave,
            wave_label=survey.wave_label, expires_at=survey.target.expires_at).model_dump(mode="json"),
            headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
    # A participant may go back to any finished page, or on to the first unfinished one, not past it.
    first_open = survey.first_unfinished()
    number = first_open if page is None else min(page, first_open)
    return _page(survey, survey.page(number), settings, notice=words(survey.language)["revealed"] if more else None)


async def form_fields(request: Request) -> dict[str, list[str]]:
    form = await request.form()
    out: dict[str, list[str]] = {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            out.setdefault(key, []).append(value)
    return out


FormFields = Annotated[dict[str, list[str]], Depends(form_fields)]


@router.post("/s/{token}", include_in_schema=False)
def submit_page(token: TokenPath, form: FormFields, session: SessionDep, settings: SettingsDep,
                request: Request) -> Response:
    try:
        survey = _open(session, settings, token)
    except LinkUnknown:
        return _not_found_page()
    except SurveyClosed as exc:
        return _closed_page(exc)
    w = words(survey.language)
    if not service.csrf_matches(settings.secret(), token, (form.get("csrf") or [""])[-1]):
        return _html("message.html", 403, title_key="closed_title", text=w["expired_form"], language=survey.language,
                     study_name=survey.study_name, contact=survey.contact)
    instrument = (form.get("page") or [""])[-1]
    page = next((p for p in survey.pages if p.instrument == instrument), None)
    if page is None or page.number > survey.first_unfinished():
        return RedirectResponse(f"/s/{token}", status_code=303)
    try:
        saved = service.save_page(session, survey, page, form, utcnow())
    except Invalid as exc:
        answers, raw, _ = service.read_form(page, form)
        return _page(survey, page, settings, raw=raw, answers=answers, errors=exc.errors or [], status_code=422)
    except SurveyClosed as exc:
        return _closed_page(exc)
    if saved.complete:
        return _html("message.html", 200, title_key="thanks_title", text=w["thanks"].format(wave=survey.wave_label),
                     language=survey.language, study_name=survey.study_name, contact=survey.contact, done=True)
    if saved.revealed:
        return RedirectResponse(f"/s/{token}?page={page.number}&more=1", status_code=303)
    return RedirectResponse(f"/s/{token}?page={page.number + 1}", status_code=303)
