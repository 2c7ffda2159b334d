from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.core.celery import HEARTBEAT_SECONDS, QUEUES, broker_reachable
from app.core.db import database_of
from app.core.errors import problem
from app.core.timeutil import utcnow
from app.health.service import heartbeats

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is alive")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The database and the broker are reachable; workers' last heartbeats",
    responses={503: {"description": "a dependency is down", "content": {"application/problem+json": {}}}},
)
def readyz(request: Request) -> Any:
    checks: dict[str, str] = {}
    workers: dict[str, Any] = {}
    try:
        with database_of(request).sessions() as session:
            seen = heartbeats(session)
        checks["database"] = "ok"
        now = utcnow()
        for queue in QUEUES:
            at = seen.get(queue)
            age = (now - at).total_seconds() if at else None
            workers[queue] = {
                "last_seen_at": at.isoformat() if at else None,
                # A worker is expected to answer the beat's ping every HEARTBEAT_SECONDS.
                "status": "ok" if age is not None and age < 3 * HEARTBEAT_SECONDS else "no recent heartbeat",
            }
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    checks["broker"] = "ok" if broker_reachable(request.app.state.settings) else "unreachable"
    if all(v == "ok" for v in checks.values()):
        return {"status": "ok", "checks": checks, "workers": workers}
    failing = ", ".join(k for k, v in checks.items() if v != "ok")
    response: JSONResponse = problem(503, f"not ready: {failing}", slug="unavailable",
                                     headers={"Retry-After": "5"}, extra={"checks": checks, "workers": workers})
    return response
