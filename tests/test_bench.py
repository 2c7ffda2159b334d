"""`cohort bench --quick` runs every scenario end to end (its speed is judged by the full run, never here)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from bench.run import TARGETS

pytestmark = pytest.mark.slow


def test_the_quick_benchmark_runs_every_scenario(pg_server: URL, tmp_path: Path) -> None:
    env = {**os.environ, "TEST_DATABASE_URL": pg_server.render_as_string(hide_password=False)}
    env.pop("DATABASE_URL", None)
    cohort = Path(sys.executable).parent / "cohort"
    # its own process group: on a timeout the servers and workers it started go too, rather than
    # live on and take tasks from the next run's queues
    bench = subprocess.Popen([str(cohort), "bench", "--quick", "--output", str(tmp_path)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = bench.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(bench.pid, signal.SIGKILL)
        stdout, stderr = bench.communicate()
        pytest.fail("cohort bench --quick did not finish in 15 minutes:\n" + stdout[-2000:] + stderr[-2000:])
    assert bench.returncode == 0, stdout[-2000:] + stderr[-2000:]
    report = json.loads((tmp_path / "latest-quick.json").read_text())
    assert report["errors"] == {}
    assert set(report["results"]) == set(TARGETS)
    results = report["results"]
    for level in results["ingest"]["levels"].values():  # every request of every load level answered
        assert level["service"]["errors"] == 0 and level["service"]["rate"] > 0
        assert 0 < level["ratio_to_bare_fastapi"] < math.inf
        # the floor replays the service's statements: every replayed response stored, none refused
        assert level["floor"]["errors"] == 0 and 0 < level["ratio_floor_to_bare_fastapi"] < math.inf
        # where a request's CPU went: the API process and PostgreSQL both did work for each one (the
        # bare endpoint's one INSERT, 150 times, can fall below /proc's 10 ms tick on the PostgreSQL side)
        for share in (level["service_cpu_ms"], level["floor_cpu_ms"], level["bare_fastapi_cpu_ms"]):
            assert share["api"] > 0 and share["client"] > 0 and share["postgres"] >= 0, share
        assert level["service_cpu_ms"]["postgres"] > 0 and level["floor_cpu_ms"]["postgres"] > 0
    # and stored, audited, every response it was sent
    replayed = results["ingest"]["posts_per_level"] * len(results["ingest"]["levels"])
    assert results["ingest"]["floor_stored"] == results["ingest"]["floor_audited"] == replayed
    assert results["ingest"]["processes"]["2"] > 0 and results["ingest"]["processes"]["errors_2"] == 0
    burst = results["burst"]
    assert burst["server_errors"] == 0 and burst["acknowledged"] == burst["responses"] == burst["stored"]
    assert results["import"]["rows"] == 3_000 and results["import"]["ratio_to_copy"] > 0
    assert results["reminder_claims"]["claimed"] == 1_000 == results["reminder_claims"]["decided"]
    assert results["retention"]["eligible_month6"] > 0
    assert all(v["ratio_api_to_statsmodels"] > 0 for v in results["refit"].values() if isinstance(v, dict))
    assert results["export"]["rows"] > 10_000
    for fmt in ("csv", "parquet"):
        assert results["export"][fmt]["mb"] > 0 and results["export"][fmt]["server_peak_rss_mb"] > 0
    assert "target:" in stdout  # the table a user reads
    assert "━" not in stdout + stderr  # not a terminal: no progress bar in the output
