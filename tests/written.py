"""What a response's writes leave in the database, in a form two databases can be compared in: the
tables they touch (by triggers too), each row as JSON ordered by content, with ids, times and sealed
bytes masked (they differ from run to run)."""

from __future__ import annotations

import json
import re

from sqlalchemy import Connection, text

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)?")
_BYTES = re.compile(r"\\\\x[0-9a-f]+")
WRITTEN = ("responses", "schedules", "participants", "idempotency_keys", "webhook_deliveries", "audit_log",
           "retention_counts", "retention_group_counts", "retention_watermarks", "reminder_sends")
# the rollups are kept in shards of a participant's (random) id: compared summed over the shards, as they are read
_KEY = "study_id, wave, opens_at, closes_at, cls, in_window, late, wd_ok"
_SUMMED = {
    "retention_counts": f"SELECT {_KEY}, sum(n) AS n FROM retention_counts GROUP BY {_KEY} HAVING sum(n) <> 0",
    "retention_group_counts": f"SELECT grp, {_KEY}, sum(n) AS n FROM retention_group_counts GROUP BY grp, {_KEY} "
                              "HAVING sum(n) <> 0",
    "retention_watermarks": "SELECT study_id, max(at) AS at FROM retention_watermarks GROUP BY study_id",
}
# the audit trail in its order: which transaction (by rank) and which row of it, each row in the order written
_AUDIT = ("SELECT to_jsonb(t) - 'id' - 'txid' || jsonb_build_object('tx', dense_rank() OVER (ORDER BY txid), "
          "'nth', row_number() OVER (PARTITION BY txid ORDER BY id)) FROM audit_log t")
# the audit trail's rows whatever transaction wrote them
_AUDIT_ROWS = "SELECT to_jsonb(t) - 'id' - 'txid' FROM audit_log t"


def rows_of(table: str, *, by_transaction: bool = True) -> str:
    """The query for `table`'s rows; the audit trail in its transactions' order, or (not
    `by_transaction`) as the rows alone, for writes whose transactions differ."""
    if table == "audit_log":
        return _AUDIT if by_transaction else _AUDIT_ROWS
    return f"SELECT to_jsonb(t) - 'seq' FROM ({_SUMMED[table]}) t" if table in _SUMMED else \
        f"SELECT to_jsonb(t) - 'seq' FROM {table} t"


def masked(row: str) -> str:
    return _BYTES.sub("<bytes>", _TIME.sub("<time>", _UUID.sub("<uuid>", row)))


def written(conn: Connection, *, by_transaction: bool = True) -> dict[str, list[str]]:
    """Every table of WRITTEN, as sorted masked rows."""
    return {table: sorted(masked(json.dumps(row, sort_keys=True))
                          for row in conn.execute(text(rows_of(table, by_transaction=by_transaction))).scalars())
            for table in WRITTEN}
