"""Compact JSON as bytes, fast: orjson, with the standard library for the little orjson refuses.

For JSON the service makes for itself (a group's rows for PostgreSQL, sealed payloads), where its
exact spelling does not matter, only its values. Client-facing JSON and hashed JSON (idempotency
fingerprints) keep their own encoders, since their bytes are compared.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson


def compact(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """`value` as JSON without spaces; integers past 64 bits go through the standard library. Floats must
    be finite (answers are checked for that): orjson writes NaN and infinity as null."""
    try:
        # times go through `default`, as with the standard library: orjson would round an offset with seconds
        return orjson.dumps(value, default=default, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME)
    except orjson.JSONEncodeError:
        return json.dumps(value, default=default, separators=(",", ":"), allow_nan=False).encode()
