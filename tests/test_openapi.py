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
