"""Entity tags and `If-Match` (RFC 9110): optimistic concurrency for edits of one resource.

A tag is a hash of what is stored, so it changes with every change. A request without
`If-Match` works as before; one whose tag is not current is refused with 412 and the current
tag (in the `ETag` header and as `current_etag` in the problem), so the client can merge and retry.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import Header

from app.core.errors import PreconditionFailed

IfMatch = Annotated[str | None, Header(
    alias="If-Match", max_length=1000,
    description="optional: the `ETag` of the version this edit is based on; a stale tag is 412 (with the "
                "current tag) instead of overwriting someone else's change. Without it the edit applies as before.",
)]

ETAG_HEADER = {"ETag": {"description": "the version of the resource; send it back in `If-Match` to edit safely",
                        "schema": {"type": "string"}}}


def etag_of(*parts: Any) -> str:
    raw = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return '"' + hashlib.sha256(raw.encode()).hexdigest()[:32] + '"'


def matches(if_match: str, current: str) -> bool:
    """Strong comparison: `*`, or one of the listed tags equal to the current one (weak tags never match)."""
    tags = [t.strip() for t in if_match.split(",")]
    return "*" in tags or current in tags


def require_current(if_match: str | None, current: str, what: str) -> None:
    if if_match is not None and not matches(if_match, current):
        raise PreconditionFailed(
            f"the {what} changed since you read it; read it again (current ETag {current}) and reapply your edit",
            errors=[{"loc": ["header", "If-Match"], "code": "stale", "message": "not the current version"}],
            headers={"ETag": current}, extra={"current_etag": current},
        )
