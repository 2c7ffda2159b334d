from __future__ import annotations

import json
from pathlib import Path

from app.openapi import render

ROOT = Path(__file__).resolve().parents[1]


def test_checked_in_openapi_is_current() -> None:
    assert (ROOT / "openapi" / "openapi.json").read_text() == render(), "run `./dev openapi` and commit the result"


def test_every_api_operation_declares_its_roles() -> None:
    document = json.loads(render())
    missing = [
        f"{method.upper()} {path}"
        for path, ops in document["paths"].items() if path.startswith("/api/")
        for method, op in ops.items() if "x-roles" not in op
    ]
    assert missing == []
    assert document["paths"]["/api/v1/tokens"]["post"]["x-roles"] == ["admin"]


def test_routers_hold_no_sql_and_commit_nothing() -> None:
    """HTTP in routers, rules in services, SQL in repositories; only the wrappers commit."""
    offending = {}
    for router in sorted((ROOT / "app").glob("*/router.py")):
        text = router.read_text()
        found = [needle for needle in ("select(", "session.execute", ".commit()", ".rollback()") if needle in text]
        if found:
            offending[router.parent.name] = found
    assert offending == {}
