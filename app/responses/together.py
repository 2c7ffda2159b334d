"""Concurrent responses stored together: one transaction for a group of `POST /responses` requests.

Each statement that stores a response fires the audit trail's and the retention rollups' triggers,
once a statement whatever its row count; for one response that fixed cost is most of what
PostgreSQL spends on it (1.3 of about 2 ms of CPU, measured on the bench). Requests that arrive while
others are being stored wait here and are then stored as a group: the first reads of all of them in
one statement (each participant locked, in the order of their external ids, so groups never wait on
each other in a circle), each request decided on its own in the order of the group as the single
path decides it, then every write once over the whole group (`app.core.db.commit_together`) and one
COMMIT. A reply is sent only after that commit, so a 201 still means durably stored.

What changes for the data is only that the group's rows share a transaction (the audit trail's
`txid`). A group holds the requests of one token for one study, one per participant and per
Idempotency-Key (see `Groups` for how groups form). A request whose decision needs anything but its
first reads (a response to merge into, a key to expire, a codebook not yet compiled), and every
request of a group whose shared transaction fails or whose participant is locked for longer than
LOCK_WAIT, is then stored on its own, exactly as without groups. A request refused by the
rules (422, 409, a replayed key) gets its answer and leaves nothing in the group's transaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session
from starlette.responses import Response

from app.core.admission import Places, run_in_place
from app.core.db import (
    Database,
    StatementRefused,
    Writes,
    carry_principal,
    commit_together,
    fetch,
    no_statements,
    on_commit,
    take_on_commit,
    take_with_commit,
)
from app.core.security import Principal
from app.core.timeutil import utcnow
from app.idempotency.service import Idempotency
from app.responses import repository, service
from app.responses.schemas import ResponseIn
from app.studies import service as studies

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Pending:
    """One request waiting to be stored: what its handler checked, and, once stored, its answer."""

    db: Database
    key: str
    body: ResponseIn
    principal: Principal
    idem: Idempotency
    request_session: Session  # carries the token's confirmation (see app.core.db.carry_principal)
    reply: Response | None = None
    error: BaseException | None = None
    alone: bool = False  # to be stored on its own, after its group
    done: asyncio.Future[None] | None = field(default=None, repr=False)

    @property
    def lane(self) -> tuple[str, Any]:
        """Requests of one lane may share a group: one study, one token."""
        return self.key, self.principal.token_id

    def joins(self, group: list[Pending]) -> bool:
        """Whether this request can go in `group` (of its lane): one request a participant and a key."""
        return all(self.body.external_id != p.body.external_id
                   and (self.idem.key is None or self.idem.key != p.idem.key) for p in group)

    def answer(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


Single = Callable[[Session, str, ResponseIn, Principal, Idempotency], Response]


@dataclass
class _Lane:
    waiting: list[Pending] = field(default_factory=list)
    running: int = 0


class Groups:
    """The requests waiting to be stored, in lanes (one study, one token): in each lane a group starts
    when none is being stored, and a second beside it only for a crowd (`crowd` waiting), up to
    `at_once`; a group holds up to `largest` requests (a request that arrives alone is a group of
    one). Lanes never wait for each other; a group waits at most LOCK_WAIT for a participant's lock,
    and a request its group sends back is stored on its own in a thread of its own, as on the single
    path, while the lane goes on. Each group runs in a worker thread with one pooled connection, once it
    has a write place (`places`: see app.core.admission), as does each request stored on its own."""

    def __init__(self, single: Single, *, at_once: int, largest: int, places: Places | None = None) -> None:
        self.single = single
        self.places = places  # a group, or a request stored on its own, holds one while it is stored
        self.at_once = max(1, at_once)
        self.largest = max(1, largest)
        self.crowd = max(2, self.largest // 4)
        self._lanes: dict[tuple[str, Any], _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        """Requests waiting for a group to be stored in."""
        return sum(len(lane.waiting) for lane in self._lanes.values())

    async def store(self, pending: Pending) -> Response:
        """Store `pending` (with others of its lane that wait meanwhile); its reply, or its error raised."""
        pending.done = asyncio.get_running_loop().create_future()
        lane = self._lanes.setdefault(pending.lane, _Lane())
        lane.waiting.append(pending)
        self._start(pending.lane, lane)
        await asyncio.shield(pending.done)  # a cancelled handler does not undo a store under way
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    def _start(self, key: tuple[str, Any], lane: _Lane) -> None:
        # A second group starts beside a running one only for a crowd: a few requests that arrive while
        # a group is stored wait for it to end and go together, rather than each on its own.
        while lane.waiting and (lane.running == 0 or (lane.running < self.at_once
                                                      and len(lane.waiting) >= self.crowd)):
            group = [lane.waiting.pop(0)]
            for pending in list(lane.waiting):
                if len(group) >= self.largest:
                    break
                if pending.joins(group):
                    lane.waiting.remove(pending)
                    group.append(pending)
            lane.running += 1
            self._spawn(self._run(key, lane, group))
        if not lane.waiting and not lane.running:
            self._lanes.pop(key, None)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: tuple[str, Any], lane: _Lane, group: list[Pending]) -> None:
        cancelled = False
        try:
            await run_in_place(self.places, lambda: _store_group(group))
        except BaseException as exc:  # the thread's own failures are each request's error already
            cancelled = isinstance(exc, asyncio.CancelledError)  # the server is stopping
            for pending in group:
                if not pending.alone and pending.error is None:
                    pending.reply, pending.error = None, exc
        finally:
            lane.running -= 1
            for pending in group:
                if not pending.alone:
                    pending.answer()
            if not cancelled:
                self._lanes.setdefault(key, lane)
                self._start(key, lane)
        if cancelled:
            raise asyncio.CancelledError
        for pending in group:
            if pending.alone:
                self._spawn(self._alone(pending))

    async def _alone(self, pending: Pending) -> None:
        try:
            await run_in_place(self.places, lambda: self._store_alone(pending))
        except BaseException as exc:
            pending.reply, pending.error = None, exc
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            pending.answer()

    # -- in a worker thread ----------------------------------------------------------------------

    def _store_alone(self, pending: Pending) -> None:
        session = pending.db.sessions()
        carry_principal(pending.request_session, session)
        try:
            pending.reply = self.single(session, pending.key, pending.body, pending.principal,
                                        pending.idem.on(session))
        except BaseException as exc:
            session.rollback()
            pending.reply, pending.error = None, exc
        finally:
            session.close()


# How long a group waits for a participant's lock (held by a withdrawal, a correction, an import)
# before it gives up and each of its requests is stored on its own, so that one busy participant
# holds up nobody else's response for longer than this.
LOCK_WAIT = "1s"


def _store_group(group: list[Pending]) -> None:
    group.sort(key=lambda p: p.body.external_id)  # one locking order for every group
    try:
        _together(group)
    except Exception as exc:
        busy = getattr(getattr(exc, "orig", None), "sqlstate", None) == "55P03"  # LOCK_WAIT passed
        log.warning("a group of %d responses could not be stored together (%s); storing each on its own",
                    len(group), "a participant's lock is held" if busy else type(exc).__name__, exc_info=not busy)
        for pending in group:
            if pending.error is None:
                pending.reply, pending.alone = None, True


def _together(group: list[Pending]) -> None:
    """Store `group` in one transaction; a request that cannot be decided from its first reads is
    marked `alone`, one the rules refuse gets its error. Raises when the transaction fails: then
    nothing of it is stored."""
    first = group[0]
    with first.db.sessions() as session:
        carry_principal(first.request_session, session)
        confirm_token = studies.confirmation_to_carry(session)
        if confirm_token is None:
            for pending in group:
                pending.alone = True
            return
        idems = [pending.idem.on(session) for pending in group]
        claims = [idem.claim_read(pending.body) for idem, pending in zip(idems, group, strict=True)]
        rows = fetch(session, *repository.opening_read_many(
            first.key, first.principal.token_id, confirm_token, LOCK_WAIT,
            [(p.body.external_id, claim[1] if claim is not None else None) for p, claim in zip(group, claims,
                                                                                              strict=True)]))
        writes: list[Writes] = []
        callbacks: list[Callable[[], None]] = []
        for pending, idem, claim, row in zip(group, idems, claims, rows, strict=True):
            opening = repository.opened(row, with_claim=claim is not None)
            if any(stored[0] == pending.body.wave for stored in opening.stored):
                pending.alone = True  # a response to merge into: its own path reads and updates it
                continue
            decided = _decide(session, pending, idem, opening)
            if decided is not None:
                writes.append(decided[0])
                callbacks += decided[1]
        if not writes:  # nothing decided here: the locks go, and the requests their own ways
            session.rollback()
            return
        for callback in callbacks:
            on_commit(session, callback)
        commit_together(session, writes)


def _decide(session: Session, pending: Pending, idem: Idempotency, opening: repository.Opening
            ) -> tuple[Writes, list[Callable[[], None]]] | None:
    """One request of a group, decided from its first reads as the single path decides it: its writes
    and after-commit work, or None (refused: `pending.error`; or to be stored alone)."""
    try:
        with no_statements(session):
            result, created = service.submit_opened(session, pending.key, pending.body, pending.principal, idem,
                                                    utcnow(), opening)
            pending.reply = idem.remember(201 if created else 200, result)
    except StatementRefused:
        pending.alone = True
    except Exception as exc:  # the rules' answer (422, 409, a replay...), for this request only
        pending.error = exc
    writes, callbacks = take_with_commit(session), take_on_commit(session)
    if pending.alone or pending.error is not None:
        pending.reply = None
        if not session.is_active:  # the refused statement was a flush's: the transaction is lost
            raise RuntimeError("a group's transaction was rolled back by a refused flush")
        return None
    return writes, callbacks
