"""The ingest benchmark's second baseline: the database work of storing one response, alone.

`record` stores one complete response through the service (run in this process, against the bench's
database, each response in a transaction of its own: concurrent responses stored together are what
the floor leaves out) and notes every statement the service sends to PostgreSQL for it, with its
parameters and what the first one returned. `bench.floor_app` then replays those statements from a bare FastAPI
endpoint (sync def, one uvicorn worker, the bare baseline's own shape), with each request's
participant, answers and fresh ids put in. Its rate is the ceiling of `POST /responses` on this
machine whatever the Python side costs: validation, tokens, idempotency and the framework all cost
nothing there, while PostgreSQL does the same work (locks, idempotency record, audit trail, rollups,
webhook outbox, commit) as for the service.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

# The parameters a replay puts in, by the names the service's statements give them
# (app.responses.repository: the first reads, then the writes with the commit).
PER_REQUEST = {
    "external_id": "the participant's external id",
    "lock": "the Idempotency-Key's advisory lock",
    "idempotency_key": "the Idempotency-Key",
    "k_key": "the Idempotency-Key",
    "k_id": "the idempotency record's id",
    "r_id": "the response's id",
    "r_answers": "the answers",
    "e_ordering": "the participant's id (the webhook event's ordering key)",
    "r_participant_id": "the participant's id",
    "s_p": "the participant's id",
}


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def record(env: dict[str, str], token: str, bodies: tuple[dict[str, Any], dict[str, Any]], spec: Path) -> None:
    """Store two responses through the service and write the statements it sent for the second to
    `spec` (a pickle `bench.floor_app` reads): [(query, params, the participant id's column in the
    row it returned, or None)]. The first warms what the running service keeps between requests
    (known tokens, study ids), so the second sends what a steady stream of responses sends."""
    import httpx

    from app.core.settings import load_settings
    from app.main import create_app

    sent: list[tuple[str, dict[str, Any], list[Any] | None]] = []
    recording = False
    execute = psycopg.Cursor.execute

    def noting(cursor: psycopg.Cursor[Any], query: Any, params: Any = None, **kw: Any) -> Any:
        result = execute(cursor, query, params, **kw)
        if recording:
            row = list(cursor.fetchone() or ()) if cursor.description else None
            if row is not None:
                cursor.scroll(0, mode="absolute")
            sent.append((str(query), dict(params or {}), row))
        return result

    async def store() -> None:
        nonlocal recording
        app = create_app(load_settings())
        app.state.response_groups = None  # one response a transaction: the statements of one alone
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            for i, body in enumerate(bodies):
                recording = i == len(bodies) - 1  # the last request's statements only
                try:
                    reply = await client.post("/api/v1/studies/bench/responses", content=json.dumps(body), headers={
                        "Authorization": f"Bearer {token}", "Content-Type": "application/json",
                        "Idempotency-Key": str(uuid.uuid4())})
                finally:
                    recording = False
                if reply.status_code != 201:
                    raise RuntimeError(f"recording the floor's statements: the service answered "
                                       f"{reply.status_code} {reply.text}")

    psycopg.Cursor.execute = noting  # type: ignore[method-assign,assignment]
    try:
        with _environment(env):
            asyncio.run(store())
    finally:
        psycopg.Cursor.execute = execute  # type: ignore[method-assign]
    statements = [(query, params, row) for query, params, row in sent
                  if not query.lstrip().upper().startswith(("SET ", "SHOW ", "BEGIN", "COMMIT"))]
    names = {name for _, params, _ in statements for name in params}
    missing = sorted(set(PER_REQUEST) - names)
    if missing:  # the service's statements changed: the replay would store the same row again
        raise RuntimeError(f"the floor replay needs parameters the service no longer sends: {missing}")
    participant = str(next(params["r_participant_id"] for _, params, _ in statements if "r_participant_id" in params))
    found = [(i, [at for at, value in enumerate(row or ()) if str(value) == participant])
             for i, (_, _, row) in enumerate(statements)]
    where = next(((i, columns[0]) for i, columns in found if columns), None)
    if where is None:
        raise RuntimeError("the floor replay cannot find the participant's id in what the service read")
    spec.write_bytes(pickle.dumps([(query, params, where[1] if i == where[0] else None)
                                   for i, (query, params, _) in enumerate(statements)]))
