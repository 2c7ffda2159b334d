"""The production stack files: checked for shape here, since no Docker engine runs on CI machines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    """Where Docker has no compose plugin to try it, the schema of the Compose Specification
    (vendored in tests/vendor/compose-spec, Apache-2.0) still checks every key and value."""
    import json

    import jsonschema

    schema = json.loads((ROOT / "tests" / "vendor" / "compose-spec" / "compose-spec.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_every_setting_the_compose_file_sets_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, service in compose()["services"].items():
        if service.get("build") != ".":
            continue
        for variable in service.get("environment", {}):
            assert f"`{variable}`" in readme, f"{name}: {variable} is not in the README's configuration table"


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
