"""`cohort bench`: run the scenarios, print a table, write bench/results/<time>.json (and latest.json)."""

from __future__ import annotations

import json
import os
import platform
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.core.progress import SILENT, Progress
from bench.common import ROOT, Databases, default_server
from bench.scenarios import FULL, QUICK, SCENARIOS, Scale

TARGETS = {
    "ingest": ">= 0.5 of a bare FastAPI endpoint at 32 clients, p99 <= 100 ms (goal: parity); 1 and 2 processes shown",
    "burst": "256 clients x 4 responses: zero 5xx, each stored once; retention read during it p99 < 1 s",
    "import": ">= 30 % of COPY of the same rows",
    "reminder_claims": "< 10 ms per 1,000 claimed at 1M participants; claim + decide + record < 50 ms per 1,000",
    "retention": "< 100 ms at 1M participants (a rollup), >= 3x faster than the plain aggregate; by primary group too",
    "refit": "API <= 1.3 x statsmodels alone at 10,000 participants",
    "export": "peak RSS < 300 MB; >= 50 % of COPY TO speed",
}


def _cpu(share: dict[str, float] | None) -> str:
    return "n/a" if not share else f"{share['api']:.2f} / {share['postgres']:.2f} / {share['client']:.2f}"


def machine() -> dict[str, Any]:
    with open("/proc/meminfo") as fh:
        mem_kb = int(fh.readline().split()[1])
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "memory_gb": round(mem_kb / 1e6, 1),
            "platform": platform.platform()}


def broker() -> str | None:
    import redis

    # a database index of this run's own (by pid), so that benchmarks run side by side on one
    # machine do not take each other's tasks from a shared queue
    url = os.environ.get("REDIS_URL") or f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        return url
    except redis.RedisError:
        return None


def run(scale: Scale, only: list[str] | None, output: Path, progress: Progress = SILENT) -> dict[str, Any]:
    report: dict[str, Any] = {"scale": scale.name, "started_at": datetime.now(UTC).isoformat(), "machine": machine(),
                              "targets": TARGETS, "results": {}, "errors": {}}
    chosen = [(name, scenario) for name, scenario in SCENARIOS.items() if not only or name in only]
    progress.step(f"{scale.name} benchmark", total=len(chosen))
    with Databases(default_server()) as dbs:
        for name, scenario in chosen:
            progress.status(f"{scale.name} benchmark: {name}")
            started = time.perf_counter()
            try:
                result = scenario(dbs, scale, broker()) if name == "refit" else scenario(dbs, scale)  # type: ignore[operator]
                report["results"][name] = {**result, "wall_seconds": time.perf_counter() - started}
            except Exception as exc:
                report["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"
            print_row(name, report)
            progress.advance()
    progress.status(f"{scale.name} benchmark")
    output.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(report, indent=2, default=str)
    (output / f"{scale.name}-{stamp}.json").write_text(text)
    (output / f"latest-{scale.name}.json").write_text(text)
    return report


def _fmt(value: float, unit: str = "") -> str:
    return f"{value:,.2f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def summary(name: str, r: dict[str, Any]) -> str:
    if name == "ingest":
        top = max(r["levels"], key=int)
        level = r["levels"][top]
        return (f"{top} clients: {level['service']['rate']:.0f} req/s (p99 {level['service']['p99_ms']:.0f} ms); "
                f"bare FastAPI {level['bare_fastapi']['rate']:.0f}, raw INSERT {level['raw_insert']['rate']:.0f}; "
                f"ratio to bare {level['ratio_to_bare_fastapi']:.2f}, to raw {level['ratio_to_raw_insert']:.2f}; "
                f"floor (its SQL alone) {level['floor']['rate']:.0f} req/s = {level['ratio_floor_to_bare_fastapi']:.2f}"
                f" of bare, service {level['ratio_to_floor']:.2f} of floor; "
                f"2 processes {r['processes']['2']:.0f} req/s; CPU ms per request (API / PostgreSQL / client): "
                f"{_cpu(level.get('service_cpu_ms'))}, floor {_cpu(level.get('floor_cpu_ms'))}, "
                f"bare {_cpu(level.get('bare_fastapi_cpu_ms'))}")
    if name == "burst":
        return (f"{r['clients']} clients, {r['responses']} responses: {r['acknowledged']} acknowledged, "
                f"{r['server_errors']} 5xx, {r['stored']} stored; {r['rate']:.0f} req/s, p99 {r['p99_ms']:.0f} ms; "
                f"retention read p99 {r['retention_p99_ms'] or 0:.0f} ms ({r['retention_reads']} reads)")
    if name == "import":
        return (f"{r['rows']:,} rows in {r['import_seconds']:.1f} s; COPY of the same rows "
                f"{r['copy_same_rows_seconds']:.1f} s -> ratio {r['ratio_to_copy']:.2f} "
                f"(participant rows alone {r['ratio_to_copy_participant_rows_only']:.2f})")
    if name == "reminder_claims":
        return (f"{r['reminder_rows']:,} send rows: claim query {r['claim_query_ms_per_1000']:.1f} ms/1000, "
                f"claim+decide {r['claim_and_decide_ms_per_1000']:.1f} ms/1000 "
                f"(bare SKIP LOCKED {r['baseline_bare_skip_locked_ms_per_1000']:.1f})")
    if name == "retention":
        return (f"{r['schedule_rows']:,} schedule rows: {r['retention_ms']:.1f} ms from the rollup, plain aggregate "
                f"{r['plain_aggregate_ms']:.0f} ms ({r['speedup_over_aggregate']:.0f}x); by group "
                f"{r['retention_by_group_ms']:.1f} ms from the group rollup, plain aggregate "
                f"{r['by_group_plain_aggregate_ms']:.0f} ms ({r['by_group_speedup_over_aggregate']:.0f}x); "
                f"bare count {r['baseline_count_by_stored_status_ms']:.0f} ms")
    if name == "refit":
        return "medians of 3: " + "; ".join(
            f"{n:,}: API {v['api_seconds']:.2f} s vs statsmodels {v['statsmodels_seconds']:.2f} s "
            f"= {v['ratio_api_to_statsmodels']:.2f}x (new data {v['ratio_new_data_to_statsmodels']:.2f}x)"
            for n, v in r.items() if isinstance(v, dict))
    if name == "export":
        return (f"{r['rows']:,} rows: CSV {r['csv']['seconds']:.1f} s ({r['csv']['ratio_to_copy_to']:.2f} of COPY TO), "
                f"peak RSS {r['csv']['server_peak_rss_mb']:.0f} MB; Parquet {r['parquet']['seconds']:.1f} s, "
                f"peak RSS {r['parquet']['server_peak_rss_mb']:.0f} MB")
    return json.dumps(r)[:200]


def print_row(name: str, report: dict[str, Any]) -> None:
    import typer

    if name in report["errors"]:
        typer.secho(f"{name:16s} FAILED: {report['errors'][name].splitlines()[0]}", fg=typer.colors.RED)
        return
    result = report["results"][name]
    typer.echo(f"{name:16s} {summary(name, result)}  [{result['wall_seconds']:.0f} s]")
    typer.echo(f"{'':16s} target: {TARGETS[name]}")


def main(quick: bool, only: list[str] | None, output: Path | None, progress: Progress = SILENT) -> dict[str, Any]:
    return run(QUICK if quick else FULL, only, output or ROOT / "bench" / "results", progress)
