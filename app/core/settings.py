"""Configuration from the environment.

The same variables configure every entry point (`cohort serve`, `worker`, `beat`, ...).
A malformed value stops start-up with a message that names the variable.
"""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import platformdirs
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError


class ConfigError(RuntimeError):
    """A setting is missing or malformed; the message names the environment variable."""


def default_data_dir() -> Path:
    # As root the embedded server runs as a dedicated system user, which must be able to
    # traverse every parent folder: /var/lib suits that, /root does not.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/cohort")
    return Path(platformdirs.user_data_dir("cohort"))


def normalise_database_url(raw: str) -> str:
    """Accept the usual spellings of a PostgreSQL URL and select the psycopg 3 driver."""
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ValueError(f"not a database URL ({exc})") from None
    backend = url.get_backend_name()
    if backend not in ("postgresql", "postgres"):
        raise ValueError(f"only PostgreSQL is supported, got {backend!r}")
    if url.drivername not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise ValueError(f"unsupported driver {url.drivername!r}; use postgresql:// or postgresql+psycopg://")
    return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    database_url: Annotated[str | None, Field(validation_alias="DATABASE_URL")] = None
    redis_url: Annotated[str | None, Field(validation_alias="REDIS_URL")] = None
    smtp_url: Annotated[str | None, Field(validation_alias="SMTP_URL")] = None
    bootstrap_token: Annotated[SecretStr | None, Field(validation_alias="COHORT_BOOTSTRAP_TOKEN")] = None
    secret_key: Annotated[SecretStr | None, Field(validation_alias="COHORT_SECRET_KEY")] = None
    old_secret_keys: Annotated[str | None, Field(validation_alias="COHORT_OLD_SECRET_KEYS")] = None
    data_dir: Annotated[Path, Field(validation_alias="COHORT_DATA_DIR")] = Field(
        default_factory=default_data_dir
    )
    public_url: Annotated[str, Field(validation_alias="COHORT_PUBLIC_URL")] = "http://127.0.0.1:8000"
    survey_url_template: Annotated[str | None, Field(validation_alias="COHORT_SURVEY_URL")] = None
    mail_from: Annotated[str, Field(validation_alias="COHORT_MAIL_FROM")] = "cohort@localhost"
    max_body_bytes: Annotated[int, Field(validation_alias="COHORT_MAX_BODY_BYTES", ge=1024)] = 1_048_576
    max_import_bytes: Annotated[int, Field(validation_alias="COHORT_MAX_IMPORT_BYTES", ge=1024)] = 64 * 1_048_576
    reminder_lease_seconds: Annotated[int, Field(validation_alias="COHORT_REMINDER_LEASE_SECONDS", ge=1)] = 600
    scan_interval_seconds: Annotated[float, Field(validation_alias="COHORT_SCAN_INTERVAL_SECONDS", gt=0)] = 60.0
    analysis_lease_seconds: Annotated[int, Field(validation_alias="COHORT_ANALYSIS_LEASE_SECONDS", ge=1)] = 1800
    rate_limit_per_minute: Annotated[int, Field(validation_alias="COHORT_RATE_LIMIT", ge=0)] = 3000
    db_pool_size: Annotated[int, Field(validation_alias="COHORT_DB_POOL_SIZE", ge=1, le=200)] = 20
    # Requests doing work at once per process (default: the pool size; a request holds at most two
    # connections, and the pool has twice its size with overflow); the rest wait in line.
    max_in_flight: Annotated[int | None, Field(validation_alias="COHORT_MAX_IN_FLIGHT", ge=1, le=200)] = None
    admission_wait_seconds: Annotated[float, Field(validation_alias="COHORT_ADMISSION_WAIT_SECONDS", gt=0)] = 30.0
    log_level: Annotated[str, Field(validation_alias="COHORT_LOG_LEVEL")] = "INFO"
    # FastAPI's native OpenTelemetry (traces, metrics, logs to the providers the OTel SDK sets up):
    # off unless asked for, since even unconfigured it looks the providers up on every request
    opentelemetry: Annotated[bool, Field(validation_alias="COHORT_OPENTELEMETRY")] = False
    # Webhooks: loopback receivers (http or https to 127.0.0.0/8 and ::1, nothing else private) are
    # for development and tests only; the rest tunes delivery.
    webhooks_allow_loopback: Annotated[bool, Field(validation_alias="COHORT_WEBHOOKS_ALLOW_LOOPBACK")] = False
    webhooks_timeout_seconds: Annotated[float, Field(validation_alias="COHORT_WEBHOOKS_TIMEOUT_SECONDS", gt=0,
                                                     le=60)] = 10.0
    webhooks_retry_seconds: Annotated[float, Field(validation_alias="COHORT_WEBHOOKS_RETRY_SECONDS", gt=0)] = 5.0
    webhooks_scan_seconds: Annotated[float, Field(validation_alias="COHORT_WEBHOOKS_SCAN_SECONDS", gt=0)] = 5.0

    @property
    def in_flight(self) -> int:
        return self.max_in_flight or self.db_pool_size

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        return normalise_database_url(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            raise ValueError("expected redis://host:port/db")
        return value

    @field_validator("smtp_url")
    @classmethod
    def _smtp_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("smtp", "smtps", "smtp+starttls") or not parts.hostname:
            raise ValueError("expected smtp://[user:password@]host[:port]")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("the port is not a number") from None
        return value

    @field_validator("secret_key")
    @classmethod
    def _secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("one of DEBUG, INFO, WARNING, ERROR")
        return value.upper()

    @property
    def embedded(self) -> bool:
        """No DATABASE_URL: the service runs its own PostgreSQL in the data directory."""
        return self.database_url is None

    @property
    def survey_url(self) -> str:
        """Where survey links point: COHORT_SURVEY_URL with {token}, or this service's /s/{token}."""
        return self.survey_url_template or f"{self.public_url.rstrip('/')}/s/{{token}}"

    @property
    def sqlalchemy_url(self) -> URL:
        if self.database_url is None:
            raise ConfigError("DATABASE_URL is not set and the embedded database has not been started")
        return make_url(self.database_url)

    def secret(self) -> str:
        """The key for encryption and signing; in embedded mode one is created and kept in the data dir."""
        if self.secret_key is not None:
            return self.secret_key.get_secret_value()
        key_file = self.data_dir / "secret.key"
        if key_file.exists():
            return key_file.read_text().strip()
        if not self.embedded:
            raise ConfigError("COHORT_SECRET_KEY must be set when DATABASE_URL is set")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(48)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key)
        return key

    def old_secrets(self) -> list[str]:
        return [k.strip() for k in (self.old_secret_keys or "").split(",") if k.strip()]


def load_settings(**overrides: object) -> Settings:
    """Read the environment; turn pydantic's report into one line per bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            field = Settings.model_fields.get(name)
            env = field.validation_alias if field is not None and field.validation_alias else name
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"{env}: {message}")
        raise ConfigError("invalid configuration: " + "; ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
