"""Bounded admission: overload becomes waiting, not failing.

A request's database work hops between FastAPI's worker threads (40 of them) while it holds a
pooled connection. With more requests in flight than connections, every thread could end up
waiting for a connection held by a request that is itself waiting for a thread: the pool's
timeout then broke the deadlock as a storm of 503s. Admitting at most as many requests as the
pool has connections for (a request holds at most two) keeps both pools out of reach of that.

The rest wait here, in arrival order, for up to `wait_seconds`; only past that is the answer a
503 problem with Retry-After. Writes may take all but `reserved_for_reads` of the places, so a
burst of responses never starves a coordinator's retention page or the dashboard.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import AsyncExitStack

from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.middleware import WORK_PREFIXES, WRITE_METHODS, send_complete

log = logging.getLogger(__name__)



class Admission:
    def __init__(self, app: ASGIApp, *, places: int, reserved_for_reads: int, wait_seconds: float) -> None:
        self.app = app
        self.places = max(1, places)
        self.reserved = min(max(0, reserved_for_reads), self.places - 1)
        self.wait_seconds = wait_seconds
        self._all: asyncio.Semaphore | None = None
        self._writes: asyncio.Semaphore | None = None

    def _semaphores(self) -> tuple[asyncio.Semaphore, asyncio.Semaphore]:
        # created on first use, inside the server's event loop
        if self._all is None or self._writes is None:
            self._all = asyncio.Semaphore(self.places)
            self._writes = asyncio.Semaphore(self.places - self.reserved)
        return self._all, self._writes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(WORK_PREFIXES):
            await self.app(scope, receive, send)
            return
        every, writes = self._semaphores()
        order = [writes, every] if scope["method"] in WRITE_METHODS else [every]  # one order: no deadlock between them
        async with AsyncExitStack() as held:
            try:
                async with asyncio.timeout(self.wait_seconds):
                    for semaphore in order:
                        await semaphore.acquire()
                        held.callback(semaphore.release)
            except TimeoutError:
                log.warning("admission: %s %s waited %.0f s for a place; 503", scope["method"], scope["path"],
                            self.wait_seconds)
                await _busy(send, self.wait_seconds)
                return
            await self.app(scope, receive, send)


async def _busy(send: Send, waited: float) -> None:
    body = json.dumps({"type": "/problems/unavailable", "title": "Service Unavailable", "status": 503,
                       "detail": f"the service is at capacity and this request waited {waited:.0f} s; retry shortly"}
                      ).encode()
    await send_complete(send, 503, body, headers=((b"retry-after", b"2"),))
