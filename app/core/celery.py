"""Celery configuration shared by the API (which enqueues) and the workers (which run tasks).

Broker: Redis when REDIS_URL is set; otherwise Celery's SQLAlchemy transport on the
service's own PostgreSQL, so the embedded default needs no Redis install (about 1 s of
polling latency, which suits reminders and model refits).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue

from app.core.db import Database
from app.core.settings import Settings, get_settings

log = logging.getLogger(__name__)

QUEUES = ("reminders", "analysis")

TASK_MODULES = ["workers.tasks", "app.participants.tasks", "app.idempotency.tasks", "app.responses.tasks",
                "app.reminders.tasks", "app.analysis.tasks", "app.webhooks.tasks"]

# The one Celery application. The API enqueues through it, `workers.celery_app` (the worker's
# entry point) configures it from the environment and connects the worker's signals.
celery_app = Celery("cohort", include=TASK_MODULES)
celery_app.set_default()


def broker_url(settings: Settings) -> str | None:
    if settings.redis_url:
        return settings.redis_url
    if settings.database_url is None:
        return None  # embedded database not started yet; configured again once it is
    return "sqla+" + settings.sqlalchemy_url.render_as_string(hide_password=False)


def configure(app: Celery, settings: Settings) -> None:
    previous = app.conf.broker_url
    url = broker_url(settings)
    app.conf.update(
        broker_url=url,
        broker_connection_retry_on_startup=True,
        # Redis redelivers an unacknowledged task after the visibility timeout; it must exceed
        # the longest task. The SQLAlchemy transport passes these options to create_engine: none.
        broker_transport_options={"visibility_timeout": 3600} if settings.redis_url else {},
        task_ignore_result=True,
        # JSON only, in and out: a broker can never hand a worker a pickle to run
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=1800,
        task_soft_time_limit=1700,
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        task_default_queue="reminders",
        task_routes={"cohort.analysis.*": {"queue": "analysis"}, "cohort.reminders.*": {"queue": "reminders"}},
        timezone="UTC",
        enable_utc=True,
        worker_hijack_root_logger=False,
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
        beat_schedule=beat_schedule(settings.scan_interval_seconds, settings.webhooks_scan_seconds),
    )
    if previous != url:
        # Connection and producer pools are created on first use and keep their broker; a process
        # that is configured again (an app factory called twice) must not publish to the old one.
        app._after_fork()


HEARTBEAT_SECONDS = 30.0


def beat_schedule(scan_interval: float = 60.0, webhook_interval: float = 5.0) -> dict[str, Any]:
    schedule: dict[str, Any] = {
        f"heartbeat-{queue}": {
            "task": "cohort.ping", "schedule": HEARTBEAT_SECONDS, "args": (queue,),
            "options": {"queue": queue, "expires": HEARTBEAT_SECONDS},
        }
        for queue in QUEUES
    }
    schedule["reminder-scan"] = {"task": "cohort.reminders.scan", "schedule": scan_interval,
                                 "options": {"expires": max(scan_interval - 1, 1)}}
    schedule["sweep-analyses"] = {"task": "cohort.analysis.sweep", "schedule": min(60.0, scan_interval),
                                  "options": {"expires": 60}}
    schedule["advance-schedules"] = {"task": "cohort.reminders.advance_schedules", "schedule": 60.0,
                                     "options": {"expires": 60}}
    schedule["recompute-derived"] = {"task": "cohort.responses.recompute_derived", "schedule": 60.0,
                                     "options": {"expires": 60}}
    schedule["deliver-webhooks"] = {"task": "cohort.webhooks.deliver", "schedule": webhook_interval,
                                    "options": {"expires": max(webhook_interval, 1)}}
    schedule["purge-idempotency-keys"] = {"task": "cohort.reminders.purge_idempotency_keys", "schedule": 3600.0,
                                          "options": {"expires": 3600}}
    return schedule


def broker_reachable(settings: Settings) -> bool:
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception as exc:
        log.warning("broker unreachable: %s", type(exc).__name__)
        return False


_task_db: Database | None = None


def task_database() -> Database:
    """The worker process's database, created on first use after the fork, never at import."""
    global _task_db
    if _task_db is None:
        settings = get_settings()
        _task_db = Database.from_settings(settings, application_name="cohort-worker")
    return _task_db


def reset_task_database() -> None:
    global _task_db
    if _task_db is not None:
        _task_db.dispose()
    _task_db = None
