"""Typed domain errors and their one mapping to RFC 9457 problem details."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

FieldError = dict[str, Any]  # {"loc": [...], "code": str, "message": str}


class DomainError(Exception):
    status_code = 400
    slug = "bad-request"

    def __init__(
        self,
        detail: str,
        *,
        errors: Sequence[FieldError] | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors) if errors is not None else None
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


class Malformed(DomainError):
    status_code, slug = 400, "malformed"


class Unauthorized(DomainError):
    status_code, slug = 401, "unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(DomainError):
    status_code, slug = 403, "forbidden"


class NotFound(DomainError):
    status_code, slug = 404, "not-found"


class Conflict(DomainError):
    status_code, slug = 409, "conflict"


class InFlight(Conflict):
    """Another request with the same Idempotency-Key is still running: retry shortly."""

    slug = "idempotency-key-in-flight"


class AlreadyComplete(Conflict):
    """The response is complete; a coordinator corrects it with PATCH."""

    slug = "response-complete"


class PreconditionFailed(DomainError):
    """An `If-Match` names a version that is no longer current; the problem carries the current one."""

    status_code, slug = 412, "precondition-failed"


class PayloadTooLarge(DomainError):
    status_code, slug = 413, "payload-too-large"


class UnsupportedMediaType(DomainError):
    status_code, slug = 415, "unsupported-media-type"


class Gone(DomainError):
    status_code, slug = 410, "gone"


class Invalid(DomainError):
    """The payload is well-formed but breaks a rule; `errors` names each bad field."""

    status_code, slug = 422, "validation"


class RateLimited(DomainError):
    status_code, slug = 429, "rate-limited"


class Unavailable(DomainError):
    status_code, slug = 503, "unavailable"


def problem(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    errors: Sequence[FieldError] | None = None,
    headers: Mapping[str, str] | None = None,
    instance: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"/problems/{slug}" if slug else "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    if errors is not None:
        body["errors"] = list(errors)
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM_JSON)


def _loc(raw: Sequence[Any]) -> list[str | int]:
    loc = list(raw)
    if loc and loc[0] == "body":
        loc = loc[1:]
    return loc


def validation_errors(exc: RequestValidationError) -> list[FieldError]:
    out = []
    for err in exc.errors():
        out.append({"loc": _loc(err.get("loc", ())), "code": err.get("type", "invalid"), "message": err["msg"]})
    return out


def _as_page(request: Request, exc: Exception) -> Any:
    """Surfaces with an error dialect of their own (the dashboard's pages, FHIR's OperationOutcome)
    render errors themselves; the app registers them by path prefix in `state.error_renderers`.
    The error still propagates through the request's transaction first, so nothing is committed."""
    for prefix, render in getattr(request.app.state, "error_renderers", ()):
        if request.url.path.startswith(prefix):
            rendered = render(request, exc)
            if rendered is not None:
                return rendered
    return None


async def _domain_error(request: Request, exc: Exception) -> Any:
    assert isinstance(exc, DomainError)
    if (as_page := _as_page(request, exc)) is not None:
        return as_page
    return problem(
        exc.status_code, exc.detail, slug=exc.slug, errors=exc.errors, headers=exc.headers,
        instance=request.url.path, extra=exc.extra,
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return problem(exc.status_code, detail, headers=exc.headers, instance=request.url.path)


async def _request_validation(request: Request, exc: Exception) -> Any:
    assert isinstance(exc, RequestValidationError)
    errors = validation_errors(exc)
    if (as_page := _as_page(request, exc)) is not None:
        return as_page
    if any(e["code"] == "json_invalid" for e in errors):
        return problem(400, "the request body is not valid JSON", slug="malformed", errors=errors,
                       instance=request.url.path)
    fields = ", ".join(".".join(str(p) for p in e["loc"]) or "body" for e in errors[:5])
    return problem(422, f"invalid request: {fields}", slug="validation", errors=errors, instance=request.url.path)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable during %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return problem(503, "the database is unavailable; retry shortly", slug="unavailable",
                   headers={"Retry-After": "2"}, instance=request.url.path)


async def _dbapi_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    if exc.connection_invalidated or isinstance(exc, OperationalError):
        return await _database_unavailable(request, exc)
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "internal error; the request was not applied", instance=request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(PoolTimeout, _database_unavailable)
    app.add_exception_handler(DBAPIError, _dbapi_error)
    # Anything else is answered by app.core.middleware.Unhandled, which keeps the connection usable.
