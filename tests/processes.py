"""Real worker, beat and Redis processes for the tests that cross process boundaries."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def env_for(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COHORT_", "DATABASE_URL", "REDIS_URL",
                                                                    "SMTP_URL"))}
    env.update(values)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_worker(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "app.cli", "worker", *args], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


_private_redis: RedisServer | None = None


def _run_redis() -> str:
    """A redis-server of this test run's own, started once and stopped when the run ends, so runs
    side by side on one machine (or a stray worker of an earlier one) never take each other's tasks."""
    global _private_redis
    if _private_redis is None:
        server = RedisServer()
        server.start()
        atexit.register(server.stop)
        _private_redis = server
    return f"redis://127.0.0.1:{_private_redis.port}"


def machine_redis(db: int) -> str | None:
    """A Redis on a database index of the test's own: this run's private server where the machine
    has the redis-server binary, else the machine's Redis if it answers."""
    url = f"{_run_redis()}/{db}" if shutil.which("redis-server") else f"redis://127.0.0.1:6379/{db}"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        client.flushdb()
        client.close()
        return url
    except redis.RedisError:
        return None


class RedisServer:
    """A private redis-server (the machine's binary) on a free port, to stop and start at will."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.binary is not None
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers, 10, "redis-server to start")

    def _answers(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
