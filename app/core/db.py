"""Engine, sessions and the one place that commits.

A request (or a task) owns its transaction: services and repositories add and flush,
the wrapper here commits before the response leaves. Work that must only happen once
the data is durable (enqueueing a Celery task, say) is registered with `on_commit`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from app.core.errors import Conflict
from app.core.settings import Settings

log = logging.getLogger(__name__)

_ON_COMMIT = "cohort_on_commit"
_ACTOR = "cohort_actor"


def make_engine(url: URL | str, *, pool_size: int = 10, application_name: str = "cohort") -> Engine:
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=10,
        connect_args={"application_name": application_name, "connect_timeout": 5},
    )


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


def remember_actor(session: Session, actor: str) -> None:
    """For a caller that has already set `cohort.actor` in the current transaction itself."""
    session.info[_ACTOR] = actor


@event.listens_for(Session, "after_begin")
def _restore_actor(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
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


@contextmanager
def _unit_of_work(db: Database, actor: str | None = None) -> Iterator[Session]:
    """Commit on success, roll back on any error: the one commit in the code base."""
    with db.sessions() as session:
        if actor:
            session.info[_ACTOR] = actor
        try:
            yield session
            session.commit()
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


def get_session(request: Request) -> Iterator[Session]:
    """The request-side transaction owner.

    Declared with scope="function" below, so the commit runs before FastAPI sends the
    response: a 201 is only ever sent for data that is durably committed.
    """
    with _unit_of_work(database_of(request)) as session:
        yield session


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
