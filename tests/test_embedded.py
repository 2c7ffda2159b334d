"""The first command of the README, as a new user runs it: no DATABASE_URL, no Redis."""

from __future__ import annotations

import email
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.factories import auth, pal_codebook

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def processes_mentioning(fragment: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline and int(pid) != os.getpid():
            found.append(int(pid))
    return found


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # /var/tmp, not pytest's tmp under /tmp/pytest-of-root: the embedded server's own user must traverse it
    path = Path(tempfile.mkdtemp(prefix="cohort-embedded-", dir="/var/tmp"))
    yield path
    for pid in processes_mentioning(str(path)):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def embedded_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "REDIS_URL", "SMTP_URL", "COHORT_BOOTSTRAP_TOKEN", "COHORT_SECRET_KEY",
                        "COHORT_PUBLIC_URL"}}
    env["COHORT_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_serve(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                                env=embedded_env(data_dir), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def test_serve_on_the_embedded_database(data_dir: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = data_dir / "serve.log"
    proc = start_serve(data_dir, port, log)
    try:
        wait_until(lambda: httpx.get(f"{base}/healthz").status_code == 200, 120, "the first start")
        output = log.read_text()
        assert f"http://127.0.0.1:{port}/docs" in output
        match = re.search(r"admin token \(shown once, keep it\): (\S+)", output)
        assert match, output
        admin = match.group(1)

        r = httpx.post(f"{base}/api/v1/studies", headers=auth(admin),
                       json={"key": "pal", "name": "PAL", "timezone": "America/Chicago", "template": "pal-replication"})
        assert r.status_code == 201, r.text
        served = httpx.get(f"{base}/api/v1/studies/pal/instruments", headers=auth(admin)).json()["items"]
        assert served == pal_codebook()["instruments"]

        # the worker started with it consumes from the database broker and reports in /readyz
        def worker_seen() -> bool:
            body = httpx.get(f"{base}/readyz").json()
            return all(body["workers"][q]["status"] == "ok" for q in ("reminders", "analysis"))

        wait_until(worker_seen, 90, "a worker heartbeat through the embedded broker")

        # the invitation's survey link points at the port this serves on (no COHORT_PUBLIC_URL set)
        yesterday = (datetime.now(UTC) - timedelta(days=1)).isoformat()
        r = httpx.post(f"{base}/api/v1/studies/pal/participants", headers=auth(admin), json={
            "external_id": "P0002", "enrolled_at": yesterday, "timezone": "UTC",
            "contact": {"email": "p0002@example.org"}})
        assert r.status_code == 201, r.text
        now = f"{datetime.now(UTC):%Y-%m-%d}T14:00:00Z"
        r = httpx.post(f"{base}/api/v1/studies/pal/reminders:run", params={"now": now}, headers=auth(admin))
        assert r.status_code == 200, r.text
        outbox = data_dir / "outbox"
        wait_until(lambda: any(outbox.glob("*.eml")), 60, "the invitation in the outbox")
        mail = email.message_from_bytes(next(outbox.glob("*.eml")).read_bytes())
        body = next(part for part in mail.walk() if part.get_content_type() == "text/plain")
        payload = body.get_payload(decode=True)
        assert isinstance(payload, bytes)
        text = payload.decode()
        assert re.search(rf"http://127\.0\.0\.1:{port}/s/\S+", text), text
    finally:
        code = stop(proc)
    assert code in (0, 128 + signal.SIGTERM), log.read_text()[-2000:]
    wait_until(lambda: not processes_mentioning(str(data_dir)), 30, "every child process to stop")

    # a command on its own starts the database for itself and stops it again
    made = subprocess.run([sys.executable, "-m", "app.cli", "token", "create", "--role", "analyst"],
                          env=embedded_env(data_dir), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert made.returncode == 0, made.stderr
    analyst = made.stdout.strip().splitlines()[-1]
    assert not processes_mentioning(str(data_dir))

    # data persists across restarts; the admin token of the first start still works
    proc = start_serve(data_dir, port, log)
    try:
        wait_until(lambda: httpx.get(f"{base}/healthz").status_code == 200, 120, "the restart")
        study = httpx.get(f"{base}/api/v1/studies/pal", headers=auth(admin))
        assert study.status_code == 200 and study.json()["timezone"] == "America/Chicago"
        assert httpx.get(f"{base}/api/v1/studies/pal", headers=auth(analyst)).status_code == 200
        second = log.read_text().split("cohort is starting")[-1]
        assert "shown once" not in second  # no new admin token on later starts
    finally:
        stop(proc)
    wait_until(lambda: not processes_mentioning(str(data_dir)), 30, "every child process to stop")


def test_a_second_serve_on_the_same_data_dir_fails_clearly(data_dir: Path) -> None:
    port = free_port()
    proc = start_serve(data_dir, port, data_dir / "first.log")
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200, 120, "start")
        second = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())],
                                env=embedded_env(data_dir), capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert second.returncode == 2
        assert "already using" in second.stderr
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        stop(proc)
    wait_until(lambda: not processes_mentioning(str(data_dir)), 30, "every child process to stop")


def test_codebook_on_disk_is_json() -> None:
    assert json.loads((ROOT / "app" / "instruments" / "codebooks" / "pal-v1.json").read_text())["key"] == "pal-v1"
