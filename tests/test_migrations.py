from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import URL

from app.registry import Base

ROOT = Path(__file__).resolve().parents[1]


def alembic_config(url: URL) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = url.render_as_string(hide_password=False)
    cfg.attributes["configure_logger"] = False
    return cfg


def tables(url: URL) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_and_no_drift(fresh_db: URL) -> None:
    cfg = alembic_config(fresh_db)
    ours = set(Base.metadata.tables)
    assert ours <= tables(fresh_db)
    command.downgrade(cfg, "base")
    assert tables(fresh_db) & ours == set()
    command.upgrade(cfg, "head")
    assert ours <= tables(fresh_db)
    command.check(cfg)  # raises if the models and the migrations disagree


def test_migration_files_are_named_by_date() -> None:
    names = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("*.py"))
    assert names
    for name in names:
        date = name.split("-")[0]
        assert len(date) == len("2026_11_25_1826") and date[:4].isdigit(), name
