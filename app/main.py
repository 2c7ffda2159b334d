"""The FastAPI application."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app.analysis.router import router as analysis_router
from app.audit.router import router as audit_router
from app.codebooks.router import router as codebooks_router
from app.core.admission import Admission, Places
from app.core.celery import celery_app
from app.core.celery import configure as configure_celery
from app.core.db import Database, transaction
from app.core.docs import install_docs
from app.core.errors import install_error_handlers
from app.core.logs import redact_access_logs
from app.core.middleware import BodyLimit, InputGuard, JsonOnly, PageHeaders, Unhandled
from app.core.openapi_problems import document_problems
from app.core.ratelimit import RateLimit
from app.core.security import KnownTokens
from app.core.settings import Settings, get_settings
from app.dashboard import auth as dashboard_auth
from app.dashboard.router import error_page
from app.dashboard.router import router as dashboard_router
from app.exports.router import router as exports_router
from app.fhir.router import render_error as fhir_errors
from app.fhir.router import router as fhir_router
from app.health.router import router as health_router
from app.idempotency.service import Replay, replay_handler
from app.participants.router import router as participants_router
from app.redcap.router import router as redcap_router
from app.reminders.router import router as reminders_router
from app.responses.router import response_groups, waits_for_a_group
from app.responses.router import router as responses_router
from app.retention.router import router as retention_router
from app.sites.router import router as sites_router
from app.studies.router import router as studies_router
from app.survey.router import router as survey_router
from app.tokens import repository as tokens_repository
from app.tokens import service as tokens
from app.tokens.router import router as tokens_router
from app.webhooks.router import router as webhooks_router
from app.withdrawals.router import router as withdrawals_router

log = logging.getLogger(__name__)

DESCRIPTION = """\
Backend for longitudinal cohort studies (first customer: a replication of the Peer ALternatives
for Addiction study). Coordinators enrol participants and chase follow-ups, survey front-ends
post validated responses, PIs read retention and refit models.

Authenticate with `Authorization: Bearer <token>`. Errors are RFC 9457 problem details.
Each operation lists the roles it admits in `x-roles`.
"""


_frozen = False


def _freeze_start_up() -> None:
    """What start-up made (modules, the ORM's and pydantic's models) lives as long as the process: kept
    out of the garbage collector's full passes, which otherwise walk all of it every second or two under
    load and stall every request meanwhile (60-110 ms each on the ingest bench, the p99 of 32 clients
    going from 160-190 ms to 70 ms). Once a process: the garbage is collected first, so only what is
    in use is kept."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


def create_app(settings: Settings | None = None, *, database: Database | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redact_access_logs()  # after the server has configured logging
        # every admitted request may be in a worker thread at once, with room for the rest
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.in_flight + 8)
        db = database or Database.from_settings(settings)
        app.state.db = db
        configure_celery(celery_app, settings)
        bootstrap = settings.bootstrap_token.get_secret_value() if settings.bootstrap_token else None

        def _bootstrap() -> str | None:
            with transaction(db) as session:
                return tokens.bootstrap(session, bootstrap)

        app.state.first_admin_token = await run_in_threadpool(_bootstrap)
        _freeze_start_up()
        try:
            yield
        finally:
            if database is None:
                db.dispose()

    app = FastAPI(
        title="cohort",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url=None,  # served below from the bundled Swagger UI files, not a CDN
        telemetry={"tracing": settings.opentelemetry, "metrics": settings.opentelemetry,
                   "logs": settings.opentelemetry},
    )
    install_docs(app)
    app.state.settings = settings
    app.state.principal_lookup = tokens_repository.principal_row
    app.state.token_check = tokens_repository.is_live
    app.state.token_check_column = tokens_repository.LIVE_ACTOR
    app.state.known_tokens = KnownTokens()
    # the places for database work (app.core.admission), shared by the admission guard and the groups
    places = Places(settings.in_flight, reserved_for_reads=max(1, settings.in_flight // 5))
    app.state.places = places
    app.state.response_groups = response_groups(settings, places)  # concurrent POST /responses stored together
    app.state.study_ids = {}  # study key -> id (keys never change): see studies.deps.study_key_in_scope
    install_error_handlers(app)
    app.state.error_renderers = [("/ui/", error_page), ("/fhir/", fhir_errors)]
    for page_error in (dashboard_auth.SignInRequired, dashboard_auth.NotAllowed):
        app.add_exception_handler(page_error, error_page)
    app.add_exception_handler(Replay, replay_handler)
    # Routes are tried in this order. The write path's router goes first: no other route matches its
    # paths, and each router tried before it cost every response a few microseconds (49 us at 8th).
    for router in (responses_router, health_router, tokens_router, studies_router, sites_router, codebooks_router,
                   participants_router, withdrawals_router, reminders_router, retention_router, analysis_router,
                   audit_router, exports_router, webhooks_router, survey_router, dashboard_router, redcap_router,
                   fhir_router):
        app.include_router(router)

    def body_limit(path: str) -> int:
        return settings.max_import_bytes if path.endswith(":import") else settings.max_body_bytes

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_problems(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # Listed from the innermost out: each guard sees only what the ones after it let through.
    app.add_middleware(Unhandled)
    app.add_middleware(Admission, places=places, wait_seconds=settings.admission_wait_seconds,
                       grouped=waits_for_a_group(app))
    app.add_middleware(InputGuard)
    app.add_middleware(JsonOnly)
    app.add_middleware(RateLimit, per_minute=settings.rate_limit_per_minute, redis_url=settings.redis_url,
                       session_identity=lambda cookie: dashboard_auth.token_of_cookie(settings, cookie),
                       session_cookie=dashboard_auth.COOKIE)
    app.add_middleware(BodyLimit, limit_for=body_limit)
    app.add_middleware(PageHeaders)
    return app
