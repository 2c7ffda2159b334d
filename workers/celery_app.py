"""The Celery application: `celery -A workers.celery_app worker` or `cohort worker`."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown, worker_ready

from app.core.celery import QUEUES, celery_app, configure, reset_task_database
from app.core.settings import get_settings

app = celery_app
configure(app, get_settings())


@worker_process_init.connect
def _fresh_engine(**_: Any) -> None:
    # Pooled connections must not be shared across a fork.
    reset_task_database()


@worker_process_shutdown.connect
def _dispose_engine(**_: Any) -> None:
    reset_task_database()


@worker_ready.connect
def _announce(**_: Any) -> None:
    # Report in at once instead of waiting for the first beat tick.
    for queue in QUEUES:
        app.send_task("cohort.ping", args=(queue,), queue=queue, expires=60)
