"""The baseline of the ingest benchmark: a bare FastAPI endpoint (sync def, one uvicorn worker)
that stores the same JSON row with a plain INSERT, without validation, auth or idempotency."""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from psycopg.types.json import Jsonb

app = FastAPI()
_local = threading.local()


def _conn() -> psycopg.Connection[Any]:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = psycopg.connect(os.environ["BENCH_RAW_DSN"], autocommit=True)
    return conn


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/store", status_code=201)
def store(body: dict[str, Any], request: Request) -> dict[str, str]:
    row_id = uuid.uuid4()
    _conn().execute("INSERT INTO bench_raw (id, participant, wave, answers) VALUES (%s, %s, %s, %s)",
                    (row_id, body["external_id"], body["wave"], Jsonb(body["answers"])))
    return {"id": str(row_id)}
