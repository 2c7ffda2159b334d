"""Test harness: real PostgreSQL with migrations applied, never SQLite or mocks.

The server is the machine's PostgreSQL on 127.0.0.1:5432 when it answers (or TEST_DATABASE_URL),
otherwise an embedded one started for the session. A template database is migrated once;
most tests run inside a transaction that is rolled back, and tests that need real commits
(concurrency, subprocesses, workers) get a database cloned from the template.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import URL, make_url

from app.core.db import Database, make_sessionmaker
from app.core.settings import Settings

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
SECRET_KEY = "test-secret-key-0123456789abcdef"


def _machine_server() -> URL | None:
    raw = os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    url = make_url(raw).set(drivername="postgresql+psycopg")
    try:
        with psycopg.connect(_conninfo(url), connect_timeout=3):
            return url
    except psycopg.OperationalError:
        return None


def _conninfo(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _admin(url: URL, sql: str) -> None:
    with psycopg.connect(_conninfo(url.set(database="postgres")), autocommit=True) as conn:
        conn.execute(sql.encode())  # DDL built from names this module made, not from input


@pytest.fixture(scope="session")
def pg_server() -> Iterator[URL]:
    url = _machine_server()
    if url is not None:
        yield url
        return
    from app.core.embedded import EmbeddedPostgres

    data_dir = Path(tempfile.mkdtemp(prefix="cohort-test-pg-", dir="/var/tmp"))
    server = EmbeddedPostgres(data_dir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def template_db(pg_server: URL) -> Iterator[URL]:
    """A database at migration head that others are cloned from."""
    from app.core.migrations import run_migrations

    name = f"cohort_tpl_{os.getpid()}"
    _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _admin(pg_server, f'CREATE DATABASE "{name}"')
    url = pg_server.set(database=name)
    run_migrations(Settings.model_construct(database_url=url.render_as_string(hide_password=False)))
    yield url
    _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def clone_database(template: URL, prefix: str = "cohort_t") -> URL:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _admin(template, f'CREATE DATABASE "{name}" TEMPLATE "{template.database}"')
    return template.set(database=name)


def drop_database(url: URL) -> None:
    _admin(url, f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')


@pytest.fixture
def fresh_db(template_db: URL) -> Iterator[URL]:
    """A database of its own, for tests whose writes must really commit."""
    url = clone_database(template_db)
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def shared_engine(template_db: URL) -> Iterator[Engine]:
    url = clone_database(template_db, prefix="cohort_s")
    engine = create_engine(url, pool_size=5)
    yield engine
    engine.dispose()
    drop_database(url)


@pytest.fixture
def connection(shared_engine: Engine) -> Iterator[Connection]:
    conn = shared_engine.connect()
    outer = conn.begin()
    yield conn
    outer.rollback()
    conn.close()


@pytest.fixture
def database(shared_engine: Engine, connection: Connection) -> Database:
    """Every session of the app joins the test's transaction; its commits become savepoints."""
    return Database(engine=shared_engine,
                    sessions=make_sessionmaker(connection, join_transaction_mode="create_savepoint"))


def make_settings(db_url: URL, tmp_path: Path, **extra: object) -> Settings:
    values: dict[str, object] = {
        "database_url": db_url.render_as_string(hide_password=False),
        "secret_key": SECRET_KEY,
        "bootstrap_token": ADMIN_TOKEN,
        "data_dir": tmp_path,
        "redis_url": None,
        "smtp_url": None,
    }
    values.update(extra)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(shared_engine: Engine, tmp_path: Path) -> Settings:
    return make_settings(shared_engine.url, tmp_path)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def app(settings: Settings, database: Database) -> AsyncIterator[FastAPI]:
    """The app with its lifespan running (bootstrap creates the admin token)."""
    from app.main import create_app

    application = create_app(settings, database=database)
    async with application.router.lifespan_context(application):
        yield application


def client_for(application: FastAPI, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://cohort.test",
                             headers=headers)


@pytest.fixture
async def app_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client without credentials."""
    async with client_for(app) as client:
        yield client


@pytest.fixture
async def admin(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app, ADMIN_TOKEN) as client:
        yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    settings: Settings
    db_url: URL


@contextmanager
def serve_app(settings: Settings, db_url: URL) -> Iterator[LiveServer]:
    """The app under uvicorn in a thread on a loopback port: real HTTP, real commits."""
    import threading

    import uvicorn

    from app.main import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the live server did not start")
        time.sleep(0.05)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", settings, db_url)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def live_server(fresh_db: URL, tmp_path: Path) -> Iterator[LiveServer]:
    with serve_app(make_settings(fresh_db, tmp_path), fresh_db) as server:
        yield server


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--deep", action="store_true", default=False,
                     help="longer reliability runs (more generated API examples)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--deep", default=False):
        os.environ.setdefault("COHORT_SCHEMATHESIS_EXAMPLES", "100")
