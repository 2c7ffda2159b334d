"""Shared plumbing of the benchmarks: scratch databases, servers in subprocesses, HTTP load, timing."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import URL, make_url

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "bench-admin-token-0123456789abcdef"
SECRET = "bench-secret-key-0123456789abcdef"


def conninfo(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def admin_execute(server: URL, sql: str) -> None:
    with psycopg.connect(conninfo(server.set(database="postgres")), autocommit=True) as conn:
        conn.execute(sql.encode())


@dataclass
class Databases:
    """Scratch databases cloned from one migrated template, dropped at the end."""

    server: URL
    template: str = ""
    made: list[str] = field(default_factory=list)

    def __enter__(self) -> Databases:
        from app.core.migrations import run_migrations
        from app.core.settings import Settings

        self.template = f"cohort_bench_tpl_{os.getpid()}"
        admin_execute(self.server, f'DROP DATABASE IF EXISTS "{self.template}" WITH (FORCE)')
        admin_execute(self.server, f'CREATE DATABASE "{self.template}"')
        url = self.server.set(database=self.template)
        run_migrations(Settings.model_construct(database_url=url.render_as_string(hide_password=False)))
        return self

    def new(self, name: str) -> URL:
        db = f"cohort_bench_{name}_{uuid.uuid4().hex[:6]}"
        admin_execute(self.server, f'CREATE DATABASE "{db}" TEMPLATE "{self.template}"')
        self.made.append(db)
        return self.server.set(database=db)

    def __exit__(self, *exc: object) -> None:
        for db in [*self.made, self.template]:
            admin_execute(self.server, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def scalar(conn: psycopg.Connection[Any], query: str, params: Any = None) -> Any:
    row = conn.execute(query.encode(), params).fetchone()
    assert row is not None
    return row[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(db: URL, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHORT_", "DATABASE_URL", "REDIS_URL"))}
    env.update(DATABASE_URL=db.render_as_string(hide_password=False), COHORT_SECRET_KEY=SECRET,
               COHORT_BOOTSTRAP_TOKEN=ADMIN, COHORT_LOG_LEVEL="WARNING", COHORT_RATE_LIMIT="0",
               PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=1):
                pass
            status, _ = request(url, "GET", "/healthz")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def serve(env: dict[str, str], *args: str, command: list[str] | None = None) -> Iterator[Process]:
    port = free_port()
    argv = command or [sys.executable, "-m", "app.cli", "serve", "--no-worker"]
    proc = subprocess.Popen([*argv, "--port", str(port), *args], env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Process(proc, port)
    try:
        wait_http(server.url)
        yield server
    finally:
        server.stop()


@contextmanager
def worker(env: dict[str, str], *args: str) -> Iterator[Process]:
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", *args], env=env, cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process = Process(proc)
    try:
        yield process
    finally:
        process.stop()


def request(base: str, method: str, path: str, body: Any = None, token: str | None = ADMIN,
            headers: dict[str, str] | None = None, raw: bytes | None = None,
            content_type: str = "application/json") -> tuple[int, Any]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    hdrs = {"Authorization": f"Bearer {token}"} if token else {}
    hdrs.update(headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        hdrs["Content-Type"] = content_type
    conn.request(method, path, body=data, headers=hdrs)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    try:
        return response.status, json.loads(payload) if payload else None
    except ValueError:
        return response.status, payload


@dataclass
class Load:
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int


def run_load(work: list[Any], clients: int, send: Callable[[Any, Any], bool],
             connect: Callable[[], Any]) -> Load:
    """`clients` threads, each with its own connection, share the list of work items."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    cursor = iter(work)

    def loop() -> None:
        nonlocal errors
        conn = connect()
        mine: list[float] = []
        bad = 0
        while True:
            with lock:
                item = next(cursor, None)
            if item is None:
                break
            started = time.perf_counter()
            ok = send(conn, item)
            mine.append(time.perf_counter() - started)
            bad += not ok
        with lock:
            latencies.extend(mine)
            errors += bad
        close = getattr(conn, "close", None)
        if close:
            close()

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return Load(rate=len(work) / elapsed, p50_ms=1000 * statistics.median(latencies),
                p99_ms=1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], errors=errors)


def http_connect(base: str, timeout: float = 120) -> Callable[[], http.client.HTTPConnection]:
    host, port = base.removeprefix("http://").split(":")
    return lambda: http.client.HTTPConnection(host, int(port), timeout=timeout)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User and system CPU of one process so far (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def _stats() -> dict[int, list[str]]:
    """Every process's /proc stat fields after its name: pid -> [state, ppid, ...], with the name first."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                name, rest = (entry / "stat").read_text().split(" (", 1)[1].rsplit(")", 1)
            except (OSError, ValueError):
                continue
            out[int(entry.name)] = [name, *rest.split()]
    return out


def _tree(root: int) -> list[int]:
    """`root` and its descendants (an API server's worker processes)."""
    parents = {pid: int(fields[2]) for pid, fields in _stats().items()}
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


@dataclass
class CpuShare:
    """CPU milliseconds per request of the API process(es), of PostgreSQL's processes and of the
    load-generating client, over one measured load (filled in when the `cpu_per_request` block ends)."""

    api: float = float("nan")
    postgres: float = float("nan")
    client: float = float("nan")


@contextmanager
def cpu_per_request(server: Process, requests: int) -> Iterator[CpuShare]:
    """Where a request's CPU goes: the server's process tree, every PostgreSQL process on this machine
    (the bench's server is the only user of it while it runs), and this process (the client threads).
    Backends that start and end inside the block are missed, so the PostgreSQL share is a floor."""

    def postgres() -> dict[int, float]:
        return {pid: _cpu_seconds(pid) for pid, fields in _stats().items() if fields[0] == "postgres"}

    api_pids = _tree(server.proc.pid)
    api_before = sum(_cpu_seconds(pid) for pid in api_pids)
    pg_before = postgres()
    client_before = sum(os.times()[:2])
    share = CpuShare()
    yield share
    pg_after = postgres()
    per = 1000 / max(1, requests)
    share.api = (sum(_cpu_seconds(pid) for pid in api_pids) - api_before) * per
    share.postgres = sum(t - pg_before.get(pid, 0.0) for pid, t in pg_after.items()) * per
    share.client = (sum(os.times()[:2]) - client_before) * per


def default_server() -> URL:
    raw = os.environ.get("DATABASE_URL") or os.environ.get("TEST_DATABASE_URL") \
        or "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    return make_url(raw).set(drivername="postgresql+psycopg")
