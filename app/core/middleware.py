"""Pure ASGI guards that run before routing: body size (413), media type (415), bytes no
handler can store (400), security headers on pages; and the last net for unexpected errors."""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import PROBLEM_JSON
from app.core.inputs import form_problems, json_problems, nul_error, query_problems

log = logging.getLogger(__name__)

_BODY_METHODS = {b"POST", b"PUT", b"PATCH"}
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Where clients and browsers do work: the API, the REDCap and FHIR adapters, the dashboard, the
# survey pages (not the health checks, the docs or the OpenAPI document).
WORK_PREFIXES = ("/api/", "/redcap/", "/fhir/", "/ui/", "/s/")


def header(scope: Scope, wanted: bytes) -> bytes | None:
    """A request header's raw value (names are lower-case in ASGI)."""
    for name, value in scope["headers"]:
        if name == wanted:
            return bytes(value)
    return None


async def send_complete(send: Send, status: int, body: bytes, media_type: bytes = PROBLEM_JSON.encode(),
                        headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """A whole response from a guard, before (or instead of) the application."""
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", media_type), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def _send_problem(send: Send, status: int, title: str, detail: str, slug: str, instance: str) -> None:
    body = json.dumps({"type": f"/problems/{slug}", "title": title, "status": status, "detail": detail,
                       "instance": instance}, separators=(",", ":")).encode()
    await send_complete(send, status, body)


class BodyLimit:
    """Refuse bodies above a limit: by Content-Length up front, or by counting a streamed body.

    A streamed body is read here in full (the framework would read it all anyway) so that an
    oversized one can be answered with 413 before any handler sees a byte of it.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"].encode() not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        too_large = f"the body is larger than the limit of {limit} bytes"
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) > limit:
                await _send_problem(send, 413, "Content Too Large", too_large, "payload-too-large", scope["path"])
                return
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > limit:
                await _send_problem(send, 413, "Content Too Large", too_large, "payload-too-large", scope["path"])
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class JsonOnly:
    """API writes take JSON (imports also take CSV); anything else is 415 before any work is done."""

    def __init__(self, app: ASGIApp, prefix: str = "/api/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"].encode() in _BODY_METHODS and scope["path"].startswith(
            self.prefix
        ):
            headers = dict(scope["headers"])
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
            allowed = ctype == b"application/json" or ctype.endswith(b"+json") or (
                ctype in (b"text/csv", b"application/csv") and scope["path"].endswith(":import")
            )
            if has_body and ctype and not allowed:
                await _send_problem(send, 415, "Unsupported Media Type",
                                    f"send application/json, not {ctype.decode(errors='replace')}",
                                    "unsupported-media-type", scope["path"])
                return
        await self.app(scope, receive, send)


async def buffer_body(receive: Receive) -> tuple[bytes, Receive]:
    """Read the whole request body; returns it and a `receive` that hands the same messages on."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break

    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return b"".join(chunks), replay


def _media_type(scope: Scope) -> bytes:
    return (header(scope, b"content-type") or b"").split(b";")[0].strip().lower()


def _rejection(path: str, detail: str, errors: list[dict[str, Any]]) -> tuple[int, bytes, bytes]:
    """The 400 in the dialect of the surface that was called: FHIR, REDCap, or problem+json."""
    if path.startswith("/fhir"):
        issues = [{"severity": "error", "code": "invalid", "details": {"text": f"{e['code']}: {e['message']}"},
                   "expression": [".".join(str(p) for p in e["loc"]) or "Resource"]} for e in errors]
        outcome = {"resourceType": "OperationOutcome", "issue": issues}
        return 400, json.dumps(outcome).encode(), b"application/fhir+json"
    if path.startswith("/redcap"):
        where = ", ".join(".".join(str(p) for p in e["loc"]) for e in errors)
        return 400, json.dumps({"error": f"{detail} ({where})"}).encode(), b"application/json"
    problem = {"type": "/problems/malformed", "title": "Bad Request", "status": 400, "detail": detail,
               "instance": path, "errors": errors}
    return 400, json.dumps(problem).encode(), PROBLEM_JSON.encode()


@functools.cache
def _path_patterns(paths: tuple[str, ...]) -> list[re.Pattern[str]]:
    return [re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(p)) + "$") for p in paths]


def _nul_path_params(scope: Scope) -> list[str]:
    """Names of the path parameters holding a NUL, from the app's published path templates;
    ["path"] where no template matches (pages and adapters outside the OpenAPI document)."""
    app: Any = scope.get("app")
    document: dict[str, Any] = app.openapi() if hasattr(app, "openapi") else {}
    for pattern in _path_patterns(tuple(document.get("paths", {}))):
        found = pattern.match(scope["path"])
        if found:
            return [name for name, value in found.groupdict().items() if "\x00" in value] or ["path"]
    return ["path"]


class InputGuard:
    """Refuse NUL characters in the path, the query and the body, and JSON nested past a sane
    depth, in one place for every route (API, pages, REDCap, FHIR), naming the field.

    Bodies are read here in full (BodyLimit, outside this guard, has already bounded them).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        errors = [nul_error(["path", name]) for name in _nul_path_params(scope)] if "\x00" in path else []
        errors += query_problems(scope.get("query_string", b""))
        if not errors and scope["method"].encode() in _BODY_METHODS:
            body, receive = await buffer_body(receive)
            media = _media_type(scope)
            if media == b"application/x-www-form-urlencoded":
                errors = form_problems(body)
            elif media.endswith(b"json") and body:
                errors = json_problems(body)
            elif b"\x00" in body:
                errors = [nul_error(["body"])]
        if errors:
            detail = ("the request holds text that cannot be stored: " +
                      ", ".join(".".join(str(p) for p in e["loc"]) or "body" for e in errors[:5]))
            plain = [e for e in errors if e["code"] in ("too_deep", "encoding")]
            if plain:
                detail = plain[0]["message"]
            status, body, media_type = _rejection(path, detail, errors)
            await send_complete(send, status, body, media_type)
            return
        await self.app(scope, receive, send)


class Unhandled:
    """The last net: an unexpected error becomes a complete 500 problem, and the connection
    stays usable (Starlette's own handler re-raises, and the server then drops the socket
    under the client's next request). A stream that fails after its first byte is cut off
    instead, so the client sees a truncated body as an error, never as a short 200."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if started:
                log.exception("error after the response started on %s %s; the stream is cut off",
                              scope["method"], scope["path"])
                raise
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            body = json.dumps({"type": "about:blank", "title": "Internal Server Error", "status": 500,
                               "detail": "internal error; the request was not applied",
                               "instance": scope["path"]}).encode()
            await send_complete(send, 500, body)


PAGE_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                 b"img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class PageHeaders:
    """Browser-facing pages (the dashboard, participants' survey pages) send headers that keep
    them out of frames, stop content sniffing and referrers, and allow no inline script."""

    def __init__(self, app: ASGIApp, prefixes: tuple[str, ...] = ("/ui", "/s/")) -> None:
        self.app = app
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in PAGE_HEADERS if n not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
