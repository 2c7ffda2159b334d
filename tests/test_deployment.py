"""The production stack files: checked for shape here, since no Docker engine runs on CI machines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def test_compose_has_every_service_with_a_healthcheck() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "api", "worker", "beat"} <= services.keys()
    for name in ("postgres", "redis", "api", "worker", "beat"):
        assert "healthcheck" in services[name], name


def test_the_app_services_use_real_servers_and_the_same_settings() -> None:
    services = compose()["services"]
    commands = {name: services[name]["command"][:2] for name in ("api", "worker", "beat")}
    assert commands == {"api": ["cohort", "serve"], "worker": ["cohort", "worker"], "beat": ["cohort", "beat"]}
    for name in ("api", "worker", "beat"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql://") and "@postgres:" in env["DATABASE_URL"]
        assert env["REDIS_URL"].startswith("redis://redis:")
        assert "COHORT_SECRET_KEY" in env and "COHORT_BOOTSTRAP_TOKEN" in env
        assert services[name]["build"] == "."


def test_dockerfile_installs_the_project_and_runs_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install" in text and 'CMD ["cohort", "serve"' in text
    for needed in ("app", "workers", "migrations", "alembic.ini", "pyproject.toml"):
        assert needed in text
