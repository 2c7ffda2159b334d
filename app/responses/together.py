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
Idempotency-Key. A request whose decision needs anything but its first reads (a response to merge
into, a key to expire, a codebook not yet compiled), and every request of a group whose shared
transaction fails, is then stored on its own, exactly as without groups. A request refused by the
rules (422, 409, a replayed key) gets its answer and leaves nothing in the group's transaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

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

    def joins(self, group: list[Pending]) -> bool:
        first = group[0]
        return (self.key == first.key and self.principal.token_id == first.principal.token_id
                and all(self.body.external_id != p.body.external_id
                        and (self.idem.key is None or self.idem.key != p.idem.key) for p in group))


Single = Callable[[Session, str, ResponseIn, Principal, Idempotency], Response]


class Groups:
    """The requests waiting to be stored, and at most `at_once` groups being stored at a time (each
    in a worker thread with one pooled connection), of at most `largest` requests."""

    def __init__(self, single: Single, *, at_once: int, largest: int) -> None:
        self.single = single
        self.at_once = max(1, at_once)
        self.largest = max(1, largest)
        self.crowd = max(2, self.largest // 4)
        self._waiting: list[Pending] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        """Requests waiting for a group to be stored in."""
        return len(self._waiting)

    async def store(self, pending: Pending) -> Response:
        """Store `pending` (with others that wait meanwhile); its reply, or its error raised."""
        pending.done = asyncio.get_running_loop().create_future()
        self._waiting.append(pending)
        self._start()
        await asyncio.shield(pending.done)  # a cancelled handler does not undo a store under way
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    def _start(self) -> None:
        # Another group starts beside a running one only for a crowd: a few requests that arrive while
        # a group is stored wait for it to end and go together, rather than each alone.
        while self._waiting and (self._running == 0 or (self._running < self.at_once
                                                        and len(self._waiting) >= self.crowd)):
            group = [self._waiting.pop(0)]
            for pending in list(self._waiting):
                if len(group) >= self.largest:
                    break
                if pending.joins(group):
                    self._waiting.remove(pending)
                    group.append(pending)
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, group: list[Pending]) -> None:
        try:
            await run_in_threadpool(self._store, group)
        except BaseException as exc:  # the thread's own failures are each request's error already
            for pending in group:
                if pending.reply is None and pending.error is None:
                    pending.error = exc
        finally:
            self._running -= 1
            for pending in group:
                if pending.done is not None and not pending.done.done():
                    pending.done.set_result(None)
            self._start()

    # -- in a worker thread ----------------------------------------------------------------------

    def _store(self, group: list[Pending]) -> None:
        group.sort(key=lambda p: p.body.external_id)  # one locking order for every group
        if len(group) > 1:
            try:
                _together(group)
            except Exception:
                log.warning("a group of %d responses could not be stored together; storing each on its own",
                            len(group), exc_info=True)
                for pending in group:
                    if pending.error is None:
                        pending.reply, pending.alone = None, True
        else:
            group[0].alone = True
        for pending in group:
            if pending.alone:
                self._alone(pending)

    def _alone(self, pending: Pending) -> None:
        session = pending.db.sessions()
        carry_principal(pending.request_session, session)
        try:
            pending.reply = self.single(session, pending.key, pending.body, pending.principal,
                                        pending.idem.on(session))
        except BaseException as exc:
            session.rollback()
            pending.error = exc
        finally:
            session.close()


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
            first.key, first.principal.token_id, confirm_token,
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
