"""The floor baseline of the ingest benchmark (see bench.floor): the statements the service sent to
store one response, replayed for each request from a bare endpoint shaped like bench.bare_app."""

from __future__ import annotations

import os
import pickle
import random
import threading
import uuid
from pathlib import Path
from typing import Any

import psycopg
from fastapi import FastAPI
from psycopg.types.json import Jsonb

app = FastAPI()
_STATEMENTS: list[tuple[str, dict[str, Any], int | None]] = pickle.loads(
    Path(os.environ["BENCH_FLOOR_SPEC"]).read_bytes())
_local = threading.local()


def _conn() -> psycopg.Connection[Any]:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = psycopg.connect(os.environ["BENCH_RAW_DSN"])
    return conn


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/store", status_code=201)
def store(body: dict[str, Any]) -> dict[str, str]:
    conn = _conn()
    key, response_id = str(uuid.uuid4()), uuid.uuid4()
    fresh: dict[str, Any] = {"external_id": body["external_id"], "lock": random.getrandbits(62),
                             "idempotency_key": key, "k_key": key, "k_id": uuid.uuid4(), "r_id": response_id,
                             "r_answers": Jsonb(body["answers"])}
    for query, params, participant_at in _STATEMENTS:
        cursor = conn.execute(query, {**params, **{k: v for k, v in fresh.items() if k in params}})
        if participant_at is not None:
            row = cursor.fetchone()
            assert row is not None
            fresh.update(e_ordering=row[participant_at], r_participant_id=row[participant_at],
                         s_p=row[participant_at])
    conn.commit()
    return {"id": str(response_id)}
