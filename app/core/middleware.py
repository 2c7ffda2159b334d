"""Pure ASGI guards that run before routing: body size (413) and media type (415)."""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import PROBLEM_JSON

_BODY_METHODS = {b"POST", b"PUT", b"PATCH"}


async def _send_problem(send: Send, status: int, title: str, detail: str, slug: str) -> None:
    body = json.dumps({"type": f"/problems/{slug}", "title": title, "status": status, "detail": detail},
                      separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


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
                await _send_problem(send, 413, "Content Too Large", too_large, "payload-too-large")
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
                await _send_problem(send, 413, "Content Too Large", too_large, "payload-too-large")
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
                                    "unsupported-media-type")
                return
        await self.app(scope, receive, send)
