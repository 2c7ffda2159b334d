"""Per-token rate limit on writes: 429 with Retry-After.

Writes are POST, PUT, PATCH and DELETE on the API, the REDCap and FHIR adapters, the dashboard's
forms and participants' survey pages. The count is keyed on who is writing, however the request
spells it: the bearer token's secret (the scheme in any case, any spacing), the REDCap token in
the form body, the token behind a dashboard session, the survey link.

A fixed one-minute window per token. With REDIS_URL the counters live in Redis, so every API
process shares them; without it, each process counts alone. If Redis cannot be reached the
limit is not enforced for a few seconds rather than refusing writes: losing a response to a
broker outage would be worse than letting a burst through.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl

import redis.asyncio as aioredis
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.middleware import WORK_PREFIXES, WRITE_METHODS, buffer_body, header, send_complete

log = logging.getLogger(__name__)

WINDOW = 60


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.strip().encode("utf-8", "replace")).hexdigest()[:24]


def _header(scope: Scope, wanted: bytes) -> str | None:
    value = header(scope, wanted)
    return value.decode("latin-1") if value is not None else None


class _Local:
    def __init__(self, max_keys: int = 100_000) -> None:
        self.counts: OrderedDict[tuple[str, int], int] = OrderedDict()
        self.max_keys = max_keys

    async def hit(self, key: str, window: int) -> int:
        slot = (key, window)
        self.counts[slot] = self.counts.get(slot, 0) + 1
        self.counts.move_to_end(slot)
        while len(self.counts) > self.max_keys:
            self.counts.popitem(last=False)
        return self.counts[slot]


class RateLimit:
    def __init__(self, app: ASGIApp, *, per_minute: int, redis_url: str | None,
                 session_identity: Callable[[str], str | None] = lambda cookie: None,
                 session_cookie: str = "cohort_session") -> None:
        self.app = app
        self.per_minute = per_minute
        self.session_identity = session_identity
        self.session_cookie = session_cookie
        self.local = _Local()
        self.redis = (aioredis.from_url(redis_url, socket_timeout=0.25, socket_connect_timeout=0.25)
                      if redis_url else None)
        self.redis_down_until = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] not in WRITE_METHODS
                or not scope["path"].startswith(WORK_PREFIXES) or self.per_minute <= 0):
            await self.app(scope, receive, send)
            return
        now = time.time()
        window = int(now // WINDOW)
        key = self._key(scope)
        if key is None:  # REDCap: the token travels in the form body
            key, receive = await self._redcap_key(scope, receive)
        count = await self._hit(key, window)
        if count > self.per_minute:
            retry = max(1, int((window + 1) * WINDOW - now) + 1)
            body = json.dumps({
                "type": "/problems/rate-limited", "title": "Too Many Requests", "status": 429,
                "detail": f"more than {self.per_minute} writes a minute with this token; retry in {retry} s",
            }).encode()
            await send_complete(send, 429, body, headers=((b"retry-after", str(retry).encode()),))
            return
        await self.app(scope, receive, send)

    def _key(self, scope: Scope) -> str | None:
        """Who is writing; None when that is in the body (REDCap)."""
        path: str = scope["path"]
        authorization = _header(scope, b"authorization")
        if authorization:
            scheme, _, secret = authorization.strip().partition(" ")
            if scheme.lower() == "bearer" and secret.strip():
                return "t:" + _digest(secret)
        if path.startswith("/redcap/"):
            return None
        if path.startswith("/s/"):
            return "l:" + _digest(path[3:].split("/", 1)[0])
        if path.startswith("/ui/"):
            cookies = SimpleCookie()
            cookies.load(_header(scope, b"cookie") or "")
            morsel = cookies.get(self.session_cookie)
            token_id = self.session_identity(morsel.value) if morsel is not None else None
            if token_id:
                return "t:id:" + token_id
        return self._by_address(scope)

    @staticmethod
    def _by_address(scope: Scope) -> str:
        client = scope.get("client")
        return f"ip:{client[0] if client else '?'}"

    async def _redcap_key(self, scope: Scope, receive: Receive) -> tuple[str, Receive]:
        body, receive = await buffer_body(receive)
        fields = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        token = fields.get("token", "").strip()
        return ("t:" + _digest(token) if token else self._by_address(scope)), receive

    async def _hit(self, key: str, window: int) -> int:
        if self.redis is not None and time.monotonic() >= self.redis_down_until:
            try:
                name = f"cohort:ratelimit:{key}:{window}"
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.incr(name)
                    pipe.expire(name, WINDOW + 5)
                    count, _ = await pipe.execute()
                return int(count)
            except (aioredis.RedisError, OSError):
                log.warning("rate limit counters unavailable (Redis); counting in this process for now")
                self.redis_down_until = time.monotonic() + 5
        return await self.local.hit(key, window)
