"""Per-token rate limit on writes (POST, PUT, PATCH, DELETE under /api/): 429 with Retry-After.

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

import redis.asyncio as aioredis
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.errors import PROBLEM_JSON

log = logging.getLogger(__name__)

WINDOW = 60
_WRITES = {"POST", "PUT", "PATCH", "DELETE"}


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
    def __init__(self, app: ASGIApp, *, per_minute: int, redis_url: str | None) -> None:
        self.app = app
        self.per_minute = per_minute
        self.local = _Local()
        self.redis = (aioredis.from_url(redis_url, socket_timeout=0.25, socket_connect_timeout=0.25)
                      if redis_url else None)
        self.redis_down_until = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] not in _WRITES or not scope["path"].startswith("/api/")
                or self.per_minute <= 0):
            await self.app(scope, receive, send)
            return
        now = time.time()
        window = int(now // WINDOW)
        count = await self._hit(self._key(scope), window)
        if count > self.per_minute:
            retry = max(1, int((window + 1) * WINDOW - now) + 1)
            body = json.dumps({
                "type": "/problems/rate-limited", "title": "Too Many Requests", "status": 429,
                "detail": f"more than {self.per_minute} writes a minute with this token; retry in {retry} s",
            }).encode()
            await send({"type": "http.response.start", "status": 429, "headers": [
                (b"content-type", PROBLEM_JSON.encode()), (b"retry-after", str(retry).encode()),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _key(scope: Scope) -> str:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return "t:" + hashlib.sha256(value).hexdigest()[:24]
        client = scope.get("client")
        return f"ip:{client[0] if client else '?'}"

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
