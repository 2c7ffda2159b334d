"""Bounded admission: overload becomes waiting, not failing.

A request's database work hops between FastAPI's worker threads (40 of them) while it holds a
pooled connection. With more requests in flight than connections, every thread could end up
waiting for a connection held by a request that is itself waiting for a thread: the pool's
timeout then broke the deadlock as a storm of 503s. Admitting at most as many requests as the
pool has connections for (a request holds at most two) keeps both pools out of reach of that.

The rest wait here, in arrival order, for up to `wait_seconds`; only past that is the answer a
503 problem with Retry-After. Writes may take all but `reserved_for_reads` of the places, so a
burst of responses never starves a coordinator's retention page or the dashboard.

Requests whose database work is done in groups (`POST /responses`: see app.responses.together) do
not take a place each. They are admitted, up to `Places.grouped` of them at once, to wait for a
group; each group then takes one write place while it is stored (one connection, one thread), as
does a request its group sends back to be stored on its own. So the places bound the connections and
threads in use exactly as before, while more responses wait together and are stored in larger groups.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.middleware import WORK_PREFIXES, WRITE_METHODS, send_complete

log = logging.getLogger(__name__)

T = TypeVar("T")

# Set in a request's scope when it was admitted to wait for a group, without a place of its own.
GROUPED = "cohort.grouped"

# Requests admitted to wait for a group, for each place: enough for a lane's two groups of 32 and
# the next ones forming at the default pool (20 places, 80 waiting).
GROUPED_PER_PLACE = 4


class Places:
    """One process's places for database work: `places` in all, all but `reserved_for_reads` of them for
    writes, and room for `grouped` requests waiting to be stored in groups."""

    def __init__(self, places: int, reserved_for_reads: int, *, grouped_per_place: int = GROUPED_PER_PLACE) -> None:
        self.places = max(1, places)
        self.reserved = min(max(0, reserved_for_reads), self.places - 1)
        self.grouped = self.places * max(1, grouped_per_place)
        self._semaphores: tuple[asyncio.Semaphore, asyncio.Semaphore, asyncio.Semaphore] | None = None

    def _made(self) -> tuple[asyncio.Semaphore, asyncio.Semaphore, asyncio.Semaphore]:
        # created on first use, inside the server's event loop
        if self._semaphores is None:
            self._semaphores = (asyncio.Semaphore(self.places), asyncio.Semaphore(self.places - self.reserved),
                                asyncio.Semaphore(self.grouped))
        return self._semaphores

    async def take(self, *, write: bool, grouped: bool = False, wait: float | None = None) -> Callable[[], None]:
        """Wait, in arrival order and at most `wait` seconds (TimeoutError past that), for a place: a write
        place, a read place, or one of the grouped ones. Returns what gives it back."""
        every, writes, waiting = self._made()
        order = [waiting] if grouped else [writes, every] if write else [every]  # one order: no deadlock
        taken: list[asyncio.Semaphore] = []

        def give_back() -> None:
            while taken:
                taken.pop().release()

        try:
            async with asyncio.timeout(wait):
                for semaphore in order:
                    await semaphore.acquire()
                    taken.append(semaphore)
        except BaseException:
            give_back()
            raise
        return give_back

class Admission:
    def __init__(self, app: ASGIApp, *, places: Places, wait_seconds: float,
                 grouped: Callable[[Scope], bool] = lambda scope: False) -> None:
        self.app = app
        self.places = places
        self.wait_seconds = wait_seconds
        self.grouped = grouped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(WORK_PREFIXES):
            await self.app(scope, receive, send)
            return
        grouped = self.grouped(scope)
        try:
            give_back = await self.places.take(write=scope["method"] in WRITE_METHODS, grouped=grouped,
                                               wait=self.wait_seconds)
        except TimeoutError:
            log.warning("admission: %s %s waited %.0f s for a place; 503", scope["method"], scope["path"],
                        self.wait_seconds)
            await _busy(send, self.wait_seconds)
            return
        if grouped:
            scope[GROUPED] = True
        try:
            await self.app(scope, receive, send)
        finally:
            give_back()


async def _busy(send: Send, waited: float) -> None:
    body = json.dumps({"type": "/problems/unavailable", "title": "Service Unavailable", "status": 503,
                       "detail": f"the service is at capacity and this request waited {waited:.0f} s; retry shortly"}
                      ).encode()
    await send_complete(send, 503, body, headers=((b"retry-after", b"2"),))


async def run_in_place(places: Places | None, work: Callable[[], T], *, when: bool = True) -> T:
    """`work` in a worker thread holding a write place (with `places`, and `when`: for a request admitted
    to wait for a group, see GROUPED, which holds none of its own). The place is given back once the
    thread is done, even when the caller is cancelled first, so the places always count every thread
    and connection that work uses."""
    if places is None or not when:
        return await run_in_threadpool(work)
    give_back = await places.take(write=True)
    try:
        running = asyncio.ensure_future(run_in_threadpool(work))
    except BaseException:
        give_back()
        raise
    running.add_done_callback(lambda _: give_back())
    return await asyncio.shield(running)


async def run_for_request(request: Request, work: Callable[[], T]) -> T:
    """A request's database work in a worker thread: in a write place of its own if the request was
    admitted to wait for a group (it holds none), in the place it holds otherwise."""
    return await run_in_place(getattr(request.app.state, "places", None), work, when=GROUPED in request.scope)
