"""Dashboard pages under /ui: the same numbers as the API, because they come from the same functions.

Every page reads through the API's own endpoint functions or services with the signed-in
token's principal, so role checks, study scoping and every number are the API's.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, time, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.orm import Session

from app.analysis import service as analyses
from app.analysis import tasks as analysis_tasks
from app.analysis.plan import PlanDoc
from app.analysis.presentation import fmt_number, fmt_p, report_html
from app.analysis.presentation import to_out as analysis_out
from app.core.crypto import settings_sealer
from app.core.db import DatabaseDep, SessionDep, on_commit
from app.core.deps import SettingsDep
from app.core.errors import DomainError, validation_errors
from app.core.security import Role
from app.core.timeutil import Day, utcnow
from app.dashboard import charts
from app.dashboard.auth import (
    COOKIE,
    MAX_AGE,
    FormViewer,
    NotAllowed,
    SignInRequired,
    Viewer,
    ViewerDep,
    sign_in,
    sign_out,
)
from app.exports import service as exports
from app.participants import repository as participants_repo
from app.participants import service as participants
from app.participants.schemas import ScheduleStatus, WithdrawIn
from app.reminders import service as reminders
from app.reminders import tasks as reminder_tasks
from app.responses import service as responses
from app.retention import service as retention
from app.sites import service as study_sites
from app.studies import repository as studies_repo
from app.studies import service as studies
from app.studies.service import StudyContext
from app.webhooks import service as webhooks
from app.withdrawals import service as withdrawals

router = APIRouter(prefix="/ui", include_in_schema=False)

templates = Environment(loader=PackageLoader("app", "templates"), autoescape=select_autoescape(["html"]))


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def _when(value: datetime | None) -> str:
    return "" if value is None else value.isoformat(timespec="seconds")


def _local_day(value: datetime | None, zone: str) -> str:
    """The last local day of a window that closes at `value` (closes_at is the midnight after it)."""
    if value is None:
        return ""
    day = (value - timedelta(microseconds=1)).astimezone(ZoneInfo(zone)).date()
    return f"{day:%a} {day.day} {day:%b %Y}"


def _local_time(value: datetime | None, zone: str) -> str:
    return "" if value is None else f"{value.astimezone(ZoneInfo(zone)):%Y-%m-%d %H:%M} ({zone})"


templates.filters.update(pct=_pct, num=fmt_number, p=fmt_p, when=_when, local_day=_local_day,
                         local_time=_local_time)


def page(request: Request, name: str, viewer: Viewer | None, status_code: int = 200, **values: Any) -> HTMLResponse:
    html = templates.get_template(name).render(request=request, viewer=viewer, **values)
    return HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})


def _study(session: Session, viewer: Viewer, key: str, *roles: Role, whole_study: bool = False) -> StudyContext:
    if roles and not viewer.may(*roles):
        raise NotAllowed(f"the {viewer.role} role cannot open this page")
    ctx = studies.context(session, key, viewer.principal)
    if whole_study and viewer.principal.sited:  # models and their data span every site
        raise NotAllowed("a token limited to one site cannot open this page: it spans every site of the study")
    return ctx


def _option_labels(ctx: StudyContext, code: str) -> dict[str, str]:
    """A choice item's option labels by code, in the codebook's order (empty if there is no such item)."""
    codebook = ctx.require_codebook()
    return {o["code"]: o["label"] for instrument in codebook.document.get("instruments", [])
            for item in instrument.get("items", []) if item.get("code") == code for o in item.get("options") or []}


def _as_of(day: date | None, zone: str) -> datetime:
    """A chosen day means the end of that day in the study's time zone; no day means now."""
    if day is None:
        return utcnow()
    return datetime.combine(day + timedelta(days=1), time(0), ZoneInfo(zone)) - timedelta(microseconds=1)


def _back(url: str, message: str) -> RedirectResponse:
    from urllib.parse import quote

    sep = "&" if "?" in url else "?"
    return RedirectResponse(f"{url}{sep}notice={quote(message)}", status_code=303)


# -- signing in ------------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> HTMLResponse:
    return page(request, "ui/login.html", None)


@router.post("/login")
def login(request: Request, session: SessionDep, settings: SettingsDep,
          token: Annotated[str, Form(max_length=200)] = "") -> Response:
    found = sign_in(session, settings, token) if token.strip() else None
    if found is None:
        return page(request, "ui/login.html", None, status_code=401,
                    error="That token is unknown or has been revoked.")
    value, _ = found
    response = RedirectResponse("/ui/", status_code=303)
    response.set_cookie(COOKIE, value, max_age=MAX_AGE, httponly=True, samesite="strict", path="/ui",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout(viewer: FormViewer, session: SessionDep) -> Response:
    sign_out(session, viewer)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response


# -- pages -----------------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def home(request: Request, viewer: ViewerDep, session: SessionDep) -> HTMLResponse:
    return page(request, "ui/home.html", viewer,
                studies=studies_repo.visible(session, viewer.principal.study_id))


@router.get("/studies/{key}", response_class=HTMLResponse)
def overview(request: Request, key: str, viewer: ViewerDep, session: SessionDep,
             as_of: Annotated[Day | None, Query(description="a day (end of day, study time zone)")] = None,
             ) -> HTMLResponse:
    ctx = _study(session, viewer, key, "coordinator", "analyst")
    when = _as_of(as_of, ctx.study.timezone)
    overall = retention.retention_report(session, ctx, when, by="primary_group")
    by_site = retention.retention_report(session, ctx, when, by="site") \
        if ctx.site_id is None and study_sites.keys_of(session, ctx.study.id) else None
    enrolled = charts.every_month(retention.enrolment_by_month(session, ctx.study.id, ctx.study.timezone,
                                                               ctx.site_id))
    retention_chart = charts.bars("Retention per wave (completed / eligible)",
                                  [(w.wave, 100 * (w.rate or 0)) for w in overall.waves], fmt="{:.0f} %",
                                  maximum=100, width=480)
    enrolment_chart = charts.bars("Participants enrolled per month", enrolled)
    hooks = webhooks.notices(session, ctx.study.id) \
        if viewer.principal.may("coordinator") and not viewer.principal.sited else []
    # groups in the codebook's option order, named by their labels; participants without a complete
    # baseline have no group yet: their table comes last, named so
    options = _option_labels(ctx, "primary_group")
    order = {code: i for i, code in enumerate(options)}
    groups = sorted(overall.groups or [], key=lambda g: (g.group == retention.UNKNOWN_GROUP,
                                                          order.get(g.group, len(order)), g.group))
    return page(request, "ui/overview.html", viewer, study=ctx.study, retention=overall, groups=groups,
                no_group=retention.UNKNOWN_GROUP, group_labels=options, as_of=when, chosen_day=as_of, enrolled=enrolled,
                total=sum(n for _, n in enrolled), retention_chart=retention_chart, enrolment_chart=enrolment_chart,
                webhook_notices=hooks, by_site=by_site)


@router.get("/studies/{key}/followup", response_class=HTMLResponse)
def worklist(request: Request, key: str, viewer: ViewerDep, session: SessionDep, settings: SettingsDep,
             wave: Annotated[str | None, Query(max_length=63)] = None,
             status: Annotated[ScheduleStatus | None,
                               Query()] = "open",
             page_no: Annotated[int, Query(alias="page", ge=1, le=10_000)] = 1,
             notice: Annotated[str | None, Query(max_length=300)] = None) -> HTMLResponse:
    ctx = _study(session, viewer, key, "coordinator")
    waves = list(ctx.require_codebook().wave_keys)
    if wave in waves:
        chosen = wave
    else:  # the wave with the most windows open now (the earliest such wave on a tie)
        busy = retention.open_windows(session, ctx.study.id, utcnow(), ctx.site_id)
        chosen = max(waves, key=lambda w: (busy.get(w, 0), -waves.index(w)))
    per_page = 50
    rows = retention.followup(session, ctx.study.id, wave=chosen, status=status, now=utcnow(), limit=per_page,
                              offset=(page_no - 1) * per_page, site_id=ctx.site_id)
    shown = rows[:per_page]
    sealer = settings_sealer(settings)
    sealed = participants_repo.sealed_contacts(session, [r.participant_id for r in shown])
    contacts = {pid: sealer.open(blob) for pid, blob in sealed.items()}  # coordinators may see contact data
    progress = responses.instrument_progress(session, ctx.require_codebook(), [r.participant_id for r in shown],
                                             chosen)
    # each form carries the version of the participant it was rendered with (sent back as If-Match)
    versions = participants.versions(session, [r.participant_id for r in shown], sealer)
    return page(request, "ui/followup.html", viewer, study=ctx.study, waves=waves, wave=chosen, status=status,
                rows=shown, contacts=contacts, progress=progress, versions=versions, page_no=page_no,
                has_next=len(rows) > per_page, notice=notice)


@router.post("/studies/{key}/followup/{external_id}/remind")
def remind(key: str, external_id: str, viewer: FormViewer, session: SessionDep,
           wave: Annotated[str, Form(max_length=63)], back: Annotated[str, Form(max_length=500)] = "") -> Response:
    ctx = _study(session, viewer, key, "coordinator")
    participant = participants.find(session, ctx, external_id)
    reminders.send_now(session, ctx.study.id, participant.id, wave, utcnow())
    on_commit(session, reminder_tasks.scan.delay)
    return _back(_safe_back(back, key), f"Reminder for {external_id} ({wave}) queued: it goes within a minute, "
                                        "or at 09:00 their time if it is outside sending hours.")


@router.post("/studies/{key}/followup/{external_id}/withdraw")
def withdraw(key: str, external_id: str, viewer: FormViewer, session: SessionDep, settings: SettingsDep,
             reason: Annotated[str, Form(min_length=1, max_length=2000)],
             erase_contact: Annotated[bool, Form()] = False,
             version: Annotated[str, Form(max_length=200, description="the participant's ETag the page showed")] = "",
             back: Annotated[str, Form(max_length=500)] = "") -> Response:
    ctx = _study(session, viewer, key, "coordinator")
    # another coordinator's change since this page was rendered is a clear 412 page, not an overwrite
    participants.require_version(session, ctx, external_id, settings_sealer(settings), version or None)
    withdrawals.withdraw(session, ctx, external_id, WithdrawIn(reason=reason, erase_contact=erase_contact),
                         utcnow())
    return _back(_safe_back(back, key), f"{external_id} is withdrawn; no further reminders will be sent.")


def _safe_back(back: str, key: str) -> str:
    """Only a page of this dashboard (never another site) is a place to return to."""
    return back if back.startswith("/ui/") and "//" not in back else f"/ui/studies/{key}/followup"


def forest(results: dict[str, Any], label: str) -> str:
    items = [charts.Interval(c["term"], "odds ratio", c.get("odds_ratio"), c.get("ci_low"), c.get("ci_high"))
             for c in results.get("coefficients", []) if c["term"].lower() != "intercept"]
    return charts.intervals(label, items, log_scale=True, reference=1.0, axis="odds ratio (log scale), 95 % CI")


@router.get("/studies/{key}/outcomes", response_class=HTMLResponse)
def outcomes(request: Request, key: str, viewer: ViewerDep, session: SessionDep,
             as_of: Annotated[Day | None, Query()] = None) -> HTMLResponse:
    ctx = _study(session, viewer, key, "coordinator", "analyst", whole_study=True)
    when = _as_of(as_of, ctx.study.timezone)
    result = retention.outcomes_report(session, ctx, when, by="online_30d")
    names = {"true": "attended online", "false": "did not attend online"}
    rate_chart = charts.intervals(
        "Abstinent in the last 30 days, by wave and baseline online attendance (95 % Wilson CI)",
        [charts.Interval(f"{r.wave} · {names.get(r.group, r.group)}", names.get(r.group, r.group),
                         r.rate, r.ci_low, r.ci_high) for r in result.items],
        axis="proportion abstinent", fmt="{:.2f}")
    latest = analyses.latest_succeeded(session, ctx.study.id)
    plan = analyses.current_plan(session, ctx)
    models = []
    for model, variant, title in _plan_models(plan.doc):
        job = latest.get((model, variant or ""))
        out = analysis_out(job, ctx.study.key) if job is not None else None
        contrasts = (job.results or {}).get("contrasts") if job is not None else None
        models.append({"model": model, "variant": variant, "title": title, "job": out,
                       "contrast_plot": contrast_plot(contrasts, f"Contrasts: {title}") if contrasts else "",
                       "plot": forest(job.results, f"Odds ratios: {title}") if job and job.results else ""})
    return page(request, "ui/outcomes.html", viewer, study=ctx.study, outcomes=result, names=names,
                rate_chart=rate_chart, models=models, as_of=when, chosen_day=as_of, plan_version=plan.version,
                waves=list(ctx.require_codebook().wave_keys))


def _plan_models(plan: PlanDoc) -> list[tuple[str, str | None, str]]:
    """The plan's regression models and their variants, in the plan's order."""
    out: list[tuple[str, str | None, str]] = []
    for key, model in plan.models.items():
        if model.kind == "table1":
            continue
        out.append((key, None, model.label or key))
        out += [(key, variant, doc.label or f"{model.label or key} ({variant})")
                for variant, doc in model.variants.items()]
    return out


def contrast_plot(contrasts: list[dict[str, Any]], label: str) -> str:
    items = [charts.Interval(c["term"], "odds ratio", c.get("odds_ratio"), c.get("ci_low"), c.get("ci_high"))
             for c in contrasts]
    return charts.intervals(label, items, log_scale=True, reference=1.0, axis="odds ratio (log scale), 95 % CI")


@router.post("/studies/{key}/analyses")
def refit(key: str, viewer: FormViewer, session: SessionDep,
          model: Annotated[str, Form(max_length=40)],
          variant: Annotated[str, Form(max_length=40)] = "") -> Response:
    ctx = _study(session, viewer, key, "analyst", whole_study=True)
    job, reused = analyses.request(session, ctx, model=model, variant=variant or None, spec=None, as_of=None,
                                   requested_by=viewer.principal.token_id)
    if not reused:
        job_id = str(job.id)
        on_commit(session, lambda: analysis_tasks.run_analysis.delay(job_id))
        return RedirectResponse(f"/ui/analyses/{job.id}", status_code=303)
    return RedirectResponse(f"/ui/analyses/{job.id}?reused=1", status_code=303)


@router.get("/analyses/{analysis_id}", response_class=HTMLResponse)
def analysis(request: Request, analysis_id: uuid.UUID, viewer: ViewerDep, session: SessionDep,
             reused: Annotated[bool, Query(description="the refit found this fit on unchanged data")] = False,
             ) -> HTMLResponse:
    job, key = analyses.get(session, analysis_id)
    ctx = _study(session, viewer, key, "coordinator", "analyst", whole_study=True)
    out = analysis_out(job, key)
    plot = forest(job.results, "Odds ratios with 95 % CI") if job.results and job.model != "table1" else ""
    # named as on the Outcomes page while it fits (the result carries its own label once done)
    plan = analyses.current_plan(session, ctx)
    titles = {(m, v or ""): t for m, v, t in _plan_models(plan.doc)}
    title = (job.results or {}).get("label") or titles.get((job.model, job.variant or "")) or job.model
    return page(request, "ui/analysis.html", viewer, job=out, study=ctx.study, plot=plot, title=title,
                waves=list(ctx.require_codebook().wave_keys), done=job.status in ("succeeded", "failed"),
                reused=reused, plan_version=plan.version)


@router.get("/analyses/{analysis_id}/report", response_class=HTMLResponse)
def analysis_report(analysis_id: uuid.UUID, viewer: ViewerDep, session: SessionDep) -> HTMLResponse:
    """The API's HTML report, for a signed-in browser (the API itself wants a bearer token)."""
    job, key = analyses.get(session, analysis_id)
    ctx = _study(session, viewer, key, "coordinator", "analyst", whole_study=True)
    return HTMLResponse(report_html(job, key, list(ctx.require_codebook().wave_keys)),
                        headers={"Cache-Control": "no-store"})


@router.get("/studies/{key}/data", response_class=HTMLResponse)
def data(request: Request, key: str, viewer: ViewerDep, session: SessionDep) -> HTMLResponse:
    ctx = _study(session, viewer, key, "analyst")
    return page(request, "ui/data.html", viewer, study=ctx.study, dates=studies.export_dates(ctx.study))


@router.get("/studies/{key}/export")
def export(key: str, viewer: ViewerDep, session: SessionDep, db: DatabaseDep, settings: SettingsDep,
           format: Annotated[Literal["csv", "parquet"], Query()] = "csv",
           layout: Annotated[Literal["long", "wide"], Query()] = "long",
           dates: Annotated[Literal["exact", "shifted", "year"] | None, Query()] = None) -> Response:
    ctx = _study(session, viewer, key, "analyst")
    export = exports.export(session, db, ctx, settings_sealer(settings), format=format, layout=layout, dates=dates)
    return StreamingResponse(export.body, media_type=export.media_type,
                             headers={"Content-Disposition": f'attachment; filename="{export.filename}"'})


@router.get("/studies/{key}/dictionary")
def dictionary(key: str, viewer: ViewerDep, session: SessionDep, settings: SettingsDep,
               dates: Annotated[Literal["exact", "shifted", "year"] | None, Query()] = None) -> Response:
    ctx = _study(session, viewer, key, "analyst")
    scope = exports.scope_of(session, ctx, settings_sealer(settings), dates)
    return Response(exports.dictionary_csv(ctx.require_codebook(), scope), media_type=exports.MEDIA["csv"],
                    headers={"Content-Disposition": f'attachment; filename="{ctx.study.key}-dictionary.csv"'})


# -- errors as pages ---------------------------------------------------------------------------------


def error_page(request: Request, exc: Exception) -> Response:
    """What a /ui request shows instead of problem+json."""
    if isinstance(exc, SignInRequired):
        return RedirectResponse("/ui/login", status_code=303)
    viewer: Viewer | None = None
    if isinstance(exc, NotAllowed):
        status, detail = 403, exc.detail
    elif isinstance(exc, DomainError):
        status, detail = exc.status_code, exc.detail
        if exc.errors:
            detail += ": " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['message']}" for e in exc.errors)
    elif isinstance(exc, RequestValidationError):
        status = 422
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['message']}" for e in validation_errors(exc))
    else:
        status, detail = 500, "internal error; nothing was changed"
    return page(request, "ui/error.html", viewer, status_code=status, status=status, detail=detail)

