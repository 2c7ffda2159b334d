from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.settings import ConfigError, load_settings, normalise_database_url

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "mysql://root@localhost/db"),
        ("DATABASE_URL", "not a url at all"),
        ("REDIS_URL", "http://localhost:6379"),
        ("SMTP_URL", "smtp://localhost:notaport"),
        ("SMTP_URL", "mailto:someone"),
        ("COHORT_SECRET_KEY", "short"),
        ("COHORT_MAX_BODY_BYTES", "ten"),
        ("COHORT_LOG_LEVEL", "LOUD"),
    ],
)
def test_a_malformed_variable_is_named(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert variable in str(err.value)


def test_postgres_urls_get_the_psycopg_driver() -> None:
    assert normalise_database_url("postgres://u:p@h:5433/d").startswith("postgresql+psycopg://u:p@h:5433/d")
    assert normalise_database_url("postgresql://h/d").startswith("postgresql+psycopg://")


def test_a_production_database_needs_a_secret_key(tmp_path: Path) -> None:
    settings = load_settings(database_url="postgresql://h/d", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="COHORT_SECRET_KEY"):
        settings.secret()


def test_embedded_mode_keeps_one_secret_key_in_the_data_dir(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    first = settings.secret()
    assert first == load_settings(data_dir=tmp_path).secret()
    assert (tmp_path / "secret.key").stat().st_mode & 0o077 == 0


def test_the_command_stops_with_the_variable_named() -> None:
    env = {**os.environ, "DATABASE_URL": "mysql://nope", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "DATABASE_URL" in proc.stderr
    assert "Traceback" not in proc.stderr
