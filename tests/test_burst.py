"""A burst of writes beyond the connection pool and the thread pool: everyone waits their turn.

Before bounded admission, requests holding a pooled connection waited for a worker thread while
every thread waited for a connection, until the pool's timeout answered 503 to most of them.
"""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from tests.conftest import ADMIN_TOKEN, clone_database, drop_database, make_settings, serve_app
from tests.factories import auth, valid_answers

pytestmark = pytest.mark.slow

CLIENTS = 64  # far more than the 3 connections (6 with overflow) and the requests admitted at once
EACH = 2


def test_a_burst_beyond_the_pools_is_acknowledged_in_full(template_db: URL, tmp_path: Path) -> None:
    db_url = clone_database(template_db)
    try:
        settings = make_settings(db_url, tmp_path, db_pool_size=3)
        with serve_app(settings, db_url) as live:
            admin = httpx.Client(base_url=live.url, headers=auth(ADMIN_TOKEN), timeout=120)
            assert admin.post("/api/v1/studies", json={"key": "burst", "name": "Burst", "timezone": "UTC",
                                                       "template": "pal-replication"}).status_code == 201
            enrolled = (datetime.now(UTC) - timedelta(days=2)).isoformat()
            rows = [{"external_id": f"B{i}", "enrolled_at": enrolled} for i in range(CLIENTS * EACH)]
            assert admin.post("/api/v1/studies/burst/participants:import", json=rows).json()["created"] == len(rows)
            collector = admin.post("/api/v1/tokens", json={"role": "collector", "label": "front-end",
                                                           "study_key": "burst"}).json()["token"]
            statuses: list[int] = []
            reads: list[int] = []
            start = threading.Barrier(CLIENTS + 1)

            def client(k: int) -> None:
                with httpx.Client(base_url=live.url, headers=auth(collector), timeout=120) as http:
                    start.wait()
                    for j in range(EACH):
                        i = k * EACH + j
                        r = http.post("/api/v1/studies/burst/responses", json={
                            "external_id": f"B{i}", "wave": "baseline", "status": "complete",
                            "answers": valid_answers("baseline", random.Random(i))},
                            headers={"Idempotency-Key": f"burst-{i}"})
                        statuses.append(r.status_code)

            def reader() -> None:
                start.wait()
                for _ in range(5):
                    reads.append(admin.get("/api/v1/studies/burst/retention").status_code)

            threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
            threads.append(threading.Thread(target=reader))
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            assert sorted(set(statuses)) == [201] and len(statuses) == CLIENTS * EACH
            assert set(reads) == {200}
            # each stored once; the audit and the retention rollup saw each exactly once
            engine = create_engine(db_url)
            with engine.connect() as conn:
                stored = conn.execute(text("SELECT count(*), count(DISTINCT participant_id) FROM responses")).one()
                audited = conn.execute(text("SELECT count(*) FROM audit_log WHERE table_name = 'responses' "
                                            "AND action = 'INSERT'")).scalar_one()
                # responses wait for a group without a place each: groups grow past the 3 places
                # (2 for writes) that bounded them when every waiting request held one
                largest = conn.execute(text("SELECT max(n) FROM (SELECT count(*) AS n FROM audit_log WHERE "
                                            "table_name = 'responses' GROUP BY txid) AS g")).scalar_one()
            engine.dispose()
            assert tuple(stored) == (CLIENTS * EACH, CLIENTS * EACH)
            assert audited == CLIENTS * EACH
            assert largest > 3, largest
            retention = admin.get("/api/v1/studies/burst/retention").json()
            baseline = next(w for w in retention["waves"] if w["wave"] == "baseline")
            assert baseline["completed"] == CLIENTS * EACH
            admin.close()
    finally:
        drop_database(db_url)
