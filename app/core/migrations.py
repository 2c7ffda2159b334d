"""Applying the Alembic migrations (the CLI, the API's start, tests and benchmarks all use this)."""

from __future__ import annotations

from pathlib import Path

from app.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def run_migrations(settings: Settings, revision: str = "head") -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = settings.sqlalchemy_url.render_as_string(hide_password=False)
    command.upgrade(cfg, revision)
