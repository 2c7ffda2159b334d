"""Engine, sessions and the one place that commits.

A request (or a task) owns its transaction: services and repositories add and flush,
the wrapper here commits before the response leaves. Work that must only happen once
the data is durable (enqueueing a Celery task, say) is registered with `on_commit`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any, cast

import psycopg
from fastapi import Depends, Request
from sqlalchemy import ColumnElement, Connection, Engine, bindparam, create_engine, event, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, Compiled, Dialect
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError, StatementError
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, Executable, UpdateBase
from starlette.concurrency import run_in_threadpool

from app.core.errors import Conflict
from app.core.jsontext import compact
from app.core.settings import Settings

log = logging.getLogger(__name__)

_ON_COMMIT = "cohort_on_commit"
_ACTOR = "cohort_actor"
_LAST = "cohort_last_statements"
_CONFIRM = "cohort_confirm_principal"
_CONFIRM_IN_STATEMENT = "cohort_confirm_in_first_statement"
_AWAITING_CONFIRMATION = "cohort_awaiting_confirmation"


# A pooled connection idle for longer than this is pinged before use (see `_ping_when_idle`).
PING_AFTER_IDLE_SECONDS = 2.0
_IDLE_SINCE = "cohort_idle_since"


def make_engine(url: URL | str, *, pool_size: int = 10, application_name: str = "cohort") -> Engine:
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=10,
        connect_args={"application_name": application_name, "connect_timeout": 5},
    )
    _ping_when_idle(engine, PING_AFTER_IDLE_SECONDS)
    return engine


def _ping_when_idle(engine: Engine, idle_seconds: float) -> None:
    """`pool_pre_ping`, for connections that have been idle a while only.

    The pre-ping is a round trip before every request's first statement: under load, a quarter of
    a response's round trips. A connection in steady use is known to be alive; one that sat idle
    (past a restart of the server, a dropped socket) is checked, and replaced when dead, as the
    pre-ping did. A connection that dies while in steady use fails its statement instead: the
    request is a 503 to retry (nothing was committed), and SQLAlchemy replaces every connection
    made before the failure on its next checkout.
    """

    @event.listens_for(engine, "connect")
    def _fresh(dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkin")
    def _returned(dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is not None and time.monotonic() - since < idle_seconds:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # the pool discards this connection and checks out another
            raise DisconnectionError("a pooled connection did not answer its ping") from exc
        if not alive:
            raise DisconnectionError("a pooled connection did not answer its ping")


def make_sessionmaker(bind: Engine | Connection, **kwargs: Any) -> sessionmaker[Session]:
    return sessionmaker(bind=bind, expire_on_commit=False, autoflush=False, **kwargs)


@dataclass
class Database:
    engine: Engine
    sessions: sessionmaker[Session]

    @classmethod
    def from_settings(cls, settings: Settings, *, application_name: str = "cohort") -> Database:
        engine = make_engine(
            settings.sqlalchemy_url, pool_size=settings.db_pool_size, application_name=application_name
        )
        return cls(engine=engine, sessions=make_sessionmaker(engine))

    def dispose(self) -> None:
        self.engine.dispose()


def on_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` after the current transaction commits; drop it on rollback."""
    session.info.setdefault(_ON_COMMIT, []).append(callback)


def owns_transactions(session: Session) -> bool:
    """Whether `session` begins and commits transactions of its own (not joined to an outer one, as in
    the tests' sessions)."""
    return isinstance(session.get_bind(), Engine)


def carry_principal(source: Session, target: Session) -> None:
    """`target`'s transactions confirm and name as the audit actor the token `source`'s do (see
    `expect_live_token`): for work done on a request's behalf in a transaction it shares with others."""
    for key in (_ACTOR, _CONFIRM):
        if key in source.info:
            target.info[key] = source.info[key]


def remember_actor(session: Session, actor: str) -> None:
    """For a caller that has already set `cohort.actor` in the current transaction itself."""
    session.info[_ACTOR] = actor


def with_commit(session: Session, statement: UpdateBase, params: Mapping[str, Any], *,
                contended: bool = False) -> None:
    """Run the write `statement` at the end of the transaction, sent with its COMMIT in one round trip.

    For writes whose result the request does not need (an idempotency record, reminders cancelled):
    they cost no round trip of their own. `contended` ones go after all others, right before the
    COMMIT: writes whose row locks concurrent writers of a study queue for, the retention rollups'
    counts and the study's watermark (by shard), kept by triggers on schedules, participants and
    responses. Taken
    in the middle of a request, such a lock is held across the rest of its round trips and Python
    work, and every other response of the study waits behind it; taken last, it is held for the
    commit only. Inside a savepoint (an import that rolls a bad record back) the statement runs at
    once, so it is undone with the savepoint.
    """
    if session.in_nested_transaction():
        session.connection().execute(statement, dict(params))
    else:
        session.info.setdefault(_LAST, []).append((contended, statement, dict(params)))


@dataclass(frozen=True)
class _DriverStatement:
    """A module-level statement compiled once for the driver (the statements are constants)."""

    statement: Executable
    compiled: Compiled
    sql: str
    processors: Mapping[str, Callable[[Any], Any]]

    def params(self, given: Mapping[str, Any]) -> Mapping[str, Any]:
        params = self.compiled.construct_params(dict(given)) or {}
        return {k: self.processors[k](v) if k in self.processors else v for k, v in params.items()}


_driver_sql: dict[tuple[int, str], _DriverStatement] = {}
_FOLD_DIALECT: Dialect = cast(Any, postgresql.psycopg).dialect()  # to read the bind parameters of a folded statement


def _compiled(statement: Executable, dialect: Dialect) -> _DriverStatement:
    key = (id(statement), dialect.name)
    cached = _driver_sql.get(key)
    if cached is None or cached.statement is not statement:
        compiled = cast(ClauseElement, statement).compile(dialect=dialect)  # every Executable here is one
        cached = _driver_sql[key] = _DriverStatement(statement, compiled, str(compiled),
                                                     dict(getattr(compiled, "_bind_processors", {})))
    return cached


@dataclass(frozen=True)
class _Fold:
    """A registered set of statements sent as `call`, one server-side call that runs them in order;
    `many`, when given, runs them once each over several requests' worth (see `commit_together`)."""

    call: Executable
    parts: tuple[tuple[UpdateBase, str], ...]  # each statement registered, with its parameters' prefix in `call`
    many: _Many | None = None


@dataclass(frozen=True)
class _Many:
    """A fold's form over several groups: `call` binds `rows`, a JSON array of every group's parameters
    by name, except the `shared` ones, bound once (every group must give the same value)."""

    call: Executable
    shared: frozenset[str]


_folds: dict[tuple[int, ...], _Fold] = {}


def fold_with_commit(sql: str, parts: Sequence[tuple[UpdateBase, str, bool]], *,
                     many: tuple[str, frozenset[str]] | None = None) -> None:
    """Send the statements of `parts`, when they are exactly those registered with `with_commit` (in
    their run order), as the one statement `sql` with the COMMIT, instead of one statement each.

    `sql` calls a server-side function that runs the same statements, each a statement of its own, in
    the same order (so their triggers fire as before). Each part is (statement, prefix, optional): the
    statement's parameter `name` is bound in `sql` as `:<prefix><name>`, typed as the statement types
    it; an optional part may be missing from the registered ones, and its parameters are then all
    NULL (the function skips it). Any other set of registered statements is sent one by one, as
    `with_commit` says; so is every set inside a session joined to an outer transaction.

    `many` is (sql, shared): a call that runs the same statements once each over several groups of
    them (`commit_together`), binding `:rows`, a JSON array of each group's parameters (`<prefix><name>`:
    value), and the `shared` names, bound once.
    """
    binds: dict[str, Any] = {}
    for statement, prefix, _ in parts:
        compiled = cast(SQLCompiler, cast(ClauseElement, statement).compile(dialect=_FOLD_DIALECT))
        for name, bind in compiled.binds.items():
            if name.isidentifier():
                binds[prefix + name] = bindparam(prefix + name, None, type_=bind.type)
    call = text(sql).bindparams(*(binds[name] for name in binds if f":{name}" in sql))
    optional = [i for i, (_, _, maybe) in enumerate(parts) if maybe]
    for leave_out in range(1 << len(optional)):
        absent = {optional[j] for j in range(len(optional)) if leave_out >> j & 1}
        kept = tuple((statement, prefix) for i, (statement, prefix, _) in enumerate(parts) if i not in absent)
        _folds[tuple(id(statement) for statement, _ in kept)] = _Fold(
            call, kept, _Many(text(many[0]), many[1]) if many is not None else None)


def _fold_of(registered: Sequence[tuple[UpdateBase, Mapping[str, Any]]]
             ) -> tuple[_Fold, dict[str, Any]] | None:
    """The fold `registered` are exactly the statements of, with the call's parameters; None if none."""
    fold = _folds.get(tuple(id(statement) for statement, _ in registered))  # held by their fold: ids stay theirs
    if fold is None:
        return None
    params: dict[str, Any] = {}
    for (_, given), (_, prefix) in zip(registered, fold.parts, strict=True):
        params.update({prefix + name: value for name, value in given.items()})
    return fold, params


def _folded(registered: Sequence[tuple[UpdateBase, Mapping[str, Any]]]
            ) -> list[tuple[Executable, Mapping[str, Any]]] | None:
    """`registered` as the one call of their fold, if they are exactly the statements of one."""
    found = _fold_of(registered)
    return None if found is None else [(found[0].call, found[1])]


Writes = list[tuple[UpdateBase, dict[str, Any]]]


def take_with_commit(session: Session) -> Writes:
    """The writes registered with `with_commit` so far, in the order they would run, taken off the
    session: one request's share of a transaction that several requests share (`commit_together`)."""
    registered: list[tuple[bool, UpdateBase, dict[str, Any]]] = session.info.pop(_LAST, [])
    return [(statement, params) for _, statement, params in sorted(registered, key=lambda r: r[0])]


def _json_value(value: Any) -> Any:
    """A parameter's value in JSON: ids and times as text, bytes as hex (decoded by the SQL)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, uuid.UUID | datetime | date):
        return value.isoformat() if isinstance(value, date) else str(value)
    raise TypeError(f"no JSON form for {type(value).__name__}")


def _many(groups: Sequence[Writes]) -> tuple[Executable, dict[str, Any]] | None:
    """Every group's writes as their fold's call over all of them, if they all fold into one fold that
    has one and agree on its shared parameters: the call's `rows` is a JSON array of each group's
    parameters by name, the shared ones are bound once."""
    found = [_fold_of(group) for group in groups]
    first = found[0] if found else None
    if first is None or first[0].many is None or any(f is None or f[0] is not first[0] for f in found):
        return None
    many = first[0].many
    params = [p for _, p in cast(list[tuple[_Fold, dict[str, Any]]], found)]
    shared = {name: params[0].get(name) for name in many.shared}
    if any(p.get(name) != value for p in params for name, value in shared.items()):
        return None
    rows = [{name: value for name, value in p.items() if name not in many.shared} for p in params]
    return many.call, {"rows": compact(rows, default=_json_value).decode(), **shared}


class StatementRefused(Exception):
    """A statement was about to be sent inside `no_statements`; nothing was sent."""


@contextmanager
def no_statements(session: Session) -> Iterator[None]:
    """Refuse, before it is sent, any statement `session` would send inside the block: for work on a
    shared transaction that may only decide, so that a request that fails leaves nothing behind in it."""
    connection = session.connection()

    def refuse(*_: Any) -> None:
        raise StatementRefused("a statement inside no_statements")

    event.listen(connection, "before_cursor_execute", refuse)
    try:
        yield
    finally:
        event.remove(connection, "before_cursor_execute", refuse)


def take_on_commit(session: Session) -> list[Callable[[], None]]:
    """The callbacks registered with `on_commit` so far, taken off the session (see `take_with_commit`)."""
    callbacks: list[Callable[[], None]] = session.info.pop(_ON_COMMIT, [])
    return callbacks


def commit_together(session: Session, groups: Sequence[Writes]) -> None:
    """Commit a transaction that several requests shared, with each one's writes (`groups`, from
    `take_with_commit`). Where all of them are one fold with a `many` form, its statements run
    once over every group (so each statement's triggers fire once, not once a request); otherwise
    each group's go as `with_commit` sends them, the groups one after the other. A failure rolls all
    of it back and is raised as SQLAlchemy raises it."""
    if session.info.pop(_AWAITING_CONFIRMATION, False):
        raise session.info[_CONFIRM][3]()
    connection = session.connection()
    together = _many(groups) if groups else None
    if together is not None:
        _send_with_commit(connection, [together])
    else:
        statements = [s for group in groups for s in (_folded(group) or group)]
        if statements:
            _send_with_commit(connection, statements)
    session.commit()


def _run_last(session: Session, pipelined: bool) -> None:
    """The statements registered with `with_commit`; with `pipelined`, COMMIT goes with them."""
    registered: list[tuple[bool, UpdateBase, dict[str, Any]]] = session.info.pop(_LAST, [])
    if not registered:
        return
    last = sorted(registered, key=lambda r: r[0])  # stable: the contended ones last, each kind in order
    session.flush()
    connection = session.connection()
    if not pipelined:  # a session joined to an outer transaction (the tests): its commit is a savepoint
        for _, statement, params in last:
            connection.execute(statement, params)
        return
    # The driver commits; SQLAlchemy's own commit after this then finds no transaction open and
    # only runs the session's after-commit work.
    statements = [(statement, params) for _, statement, params in last]
    _send_with_commit(connection, _folded(statements) or statements)


def _send_with_commit(connection: Connection, statements: Sequence[tuple[Executable, Mapping[str, Any]]]) -> None:
    """`statements` (module-level constants, compiled once), each after the one before, then the COMMIT.
    Several go in one pipelined round trip with it; one alone is sent on its own and the COMMIT after
    it, which costs the API process less than a pipeline of the two (measured side by side: 0.3-0.46 ms
    less CPU a response) for one more round trip. A failure is raised as SQLAlchemy would have raised
    it (see `_as_sqlalchemy_error`); nothing is committed then."""
    raw = cast(psycopg.Connection[Any], connection.connection.driver_connection)
    if len(statements) == 1:
        _plain(connection, *statements[0])
        try:
            raw.commit()
        except psycopg.Error as exc:
            raise _as_sqlalchemy_error("COMMIT", exc, connection) from exc
        return
    sql = ""
    try:
        with raw.pipeline():
            for statement, params in statements:
                driver = _compiled(statement, connection.dialect)
                sql = driver.sql
                raw.execute(sql, driver.params(params))
            raw.commit()
    except psycopg.Error as exc:
        raise _as_sqlalchemy_error(sql, exc, connection) from exc


def _as_sqlalchemy_error(sql: str, exc: psycopg.Error, connection: Connection) -> StatementError:
    """A driver error of a statement sent past SQLAlchemy, raised as SQLAlchemy would have raised it, so the
    error handlers treat it as any other database error (a lost connection or a deadlock is a 503 to retry)."""
    return DBAPIError.instance(sql, None, exc, psycopg.Error, ismulti=False, dialect=connection.dialect)


def fetch(session: Session, statement: Executable, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of one read that starts the transaction, sent straight to the driver (its BEGIN goes
    first). The statement is a module-level constant (compiled once); rows are the driver's tuples,
    typed as the driver loads them (no ORM). A failure is raised as SQLAlchemy would raise it.
    """
    connection = session.connection()
    if not isinstance(session.get_bind(), Engine):  # a session joined to an outer transaction (the tests)
        return [tuple(row) for row in connection.execute(statement, dict(params))]
    return _plain(connection, statement, params)


def _plain(connection: Connection, statement: Executable, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """One statement sent on its own (no pipeline); its rows, if it returns any."""
    raw = cast(psycopg.Connection[Any], connection.connection.driver_connection)
    driver = _compiled(statement, connection.dialect)
    try:
        cursor = raw.execute(driver.sql, driver.params(params))
        return cursor.fetchall() if cursor.description is not None else []
    except psycopg.Error as exc:
        raise _as_sqlalchemy_error(driver.sql, exc, connection) from exc


@dataclass(frozen=True)
class Confirmation:
    """The token's confirmation as a column of another statement: `column` is built once (so the
    statement carrying it is too, and SQLAlchemy's statement cache keeps working); `params` binds
    its one parameter, `confirm_token`, for this request."""

    column: ColumnElement[Any]
    params: dict[str, Any]


def expect_live_token(session: Session, token_id: uuid.UUID, check: Callable[[Connection, uuid.UUID], bool],
                      column: ColumnElement[Any], refuse: Callable[[], Exception]) -> None:
    """Each transaction of `session` starts by confirming the token is not revoked (`check`, which also
    names it as the audit actor); a revoked one raises `refuse()` before any other statement runs.

    `column` is the same confirmation as a column a first statement can carry (see `confirming`),
    with the token's id bound to `confirm_token`.
    """
    session.info[_ACTOR] = str(token_id)
    session.info[_CONFIRM] = (token_id, check, column, refuse)


def confirming(session: Session) -> Confirmation | None:
    """A column for the transaction's first statement that confirms the token and names the actor,
    so the confirmation costs no round trip of its own (the study lookup that starts most requests
    carries it). None when there is nothing to confirm or the transaction has begun. The caller
    passes the column's value to `confirmed` before anything else; a transaction whose confirmation
    was left to its first statement and never checked is refused at commit.
    """
    pending = session.info.get(_CONFIRM)
    if pending is None or session.in_transaction():
        return None
    token_id, _, column, _ = pending
    session.info[_CONFIRM_IN_STATEMENT] = True
    return Confirmation(column, {"confirm_token": token_id})


def confirmed(session: Session, value: Any) -> None:
    """The value of the `confirming` column: None means the token was revoked."""
    session.info.pop(_AWAITING_CONFIRMATION, None)
    pending = session.info.get(_CONFIRM)
    if pending is not None and value is None:
        raise pending[3]()


@event.listens_for(Session, "after_begin")
def _restore_actor(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    token = session.info.get(_CONFIRM)
    if token is not None:
        if session.info.pop(_CONFIRM_IN_STATEMENT, False):
            session.info[_AWAITING_CONFIRMATION] = True  # the first statement carries it (see `confirming`)
            return
        token_id, check, _, refuse = token
        if not check(connection, token_id):
            raise refuse()
        return
    actor = session.info.get(_ACTOR)
    if actor:
        connection.execute(text("SELECT set_config('cohort.actor', :actor, true)"), {"actor": actor})


@event.listens_for(Session, "after_commit")
def _run_on_commit(session: Session) -> None:
    callbacks = session.info.pop(_ON_COMMIT, [])
    for callback in callbacks:
        try:
            callback()
        except Exception:
            # The data is committed; a failed follow-up (e.g. broker down) is picked up by a sweeper.
            log.exception("after-commit callback failed")


@event.listens_for(Session, "after_soft_rollback")
def _drop_on_commit(session: Session, previous_transaction: SessionTransaction) -> None:
    if previous_transaction.parent is None:
        session.info.pop(_ON_COMMIT, None)
        session.info.pop(_LAST, None)


@contextmanager
def _unit_of_work(db: Database, actor: str | None = None) -> Iterator[Session]:
    """Commit on success, roll back on any error: the one commit in the code base."""
    with db.sessions() as session:
        if actor:
            session.info[_ACTOR] = actor
        try:
            yield session
            _commit(session)
        except BaseException:
            session.rollback()
            raise


def transaction(db: Database, *, actor: str | None = None) -> AbstractContextManager[Session]:
    """The task-side transaction owner (tasks, the CLI, start-up)."""
    return _unit_of_work(db, actor)


def database_of(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


async def get_db(request: Request) -> Database:
    return database_of(request)


def _commit(session: Session) -> None:
    if session.info.pop(_AWAITING_CONFIRMATION, False):
        raise session.info[_CONFIRM][3]()  # a `confirming` column whose value was never checked
    _run_last(session, pipelined=isinstance(session.get_bind(), Engine))
    session.commit()


def commit_here(session: Session) -> None:
    """Commit the request's transaction now, in the thread that did its work.

    For an endpoint that runs all of its database work in one thread hop: committing here saves the
    request wrapper a second hop (the wrapper then finds nothing left to commit). Anything raised
    before this point still rolls the whole transaction back.
    """
    _finish(session, failed=False)


def rollback_here(session: Session) -> None:
    """Roll the request's transaction back now, in the thread that did its work (the failing twin of
    `commit_here`, for work that must not leave its connection checked out once it returns)."""
    if session.in_transaction():
        _finish(session, failed=True)


def _finish(session: Session, failed: bool) -> None:
    try:
        if failed:
            session.rollback()
        else:
            _commit(session)
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


async def get_session(request: Request) -> AsyncIterator[Session]:
    """The request-side transaction owner.

    Declared with scope="function" below, so the commit runs before FastAPI sends the
    response: a 201 is only ever sent for data that is durably committed. Opening a session
    takes no connection (the first statement does, in the thread that runs it), so this runs
    on the event loop; the commit or rollback runs in a worker thread, unless the endpoint
    committed already (`commit_here`).
    """
    session = database_of(request).sessions()
    try:
        yield session
    except BaseException:
        if session.in_transaction():
            await run_in_threadpool(_finish, session, True)
        else:
            session.close()
        raise
    if session.in_transaction() or session.info.get(_LAST):
        await run_in_threadpool(_finish, session, False)
    else:
        session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
DatabaseDep = Annotated[Database, Depends(get_db)]


def is_unique_violation(exc: IntegrityError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == "23505"


def add_unique(session: Session, obj: object, conflict: str) -> None:
    """Insert `obj`; a clash on a unique natural key becomes a 409, decided by the database."""
    try:
        with session.begin_nested():
            session.add(obj)
            session.flush()
    except IntegrityError as exc:
        if is_unique_violation(exc):
            raise Conflict(conflict) from None
        raise
