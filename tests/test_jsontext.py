"""The service's own JSON (a group's rows for PostgreSQL, sealed payloads) keeps every value."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from app.core.jsontext import compact

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(values)
def test_what_is_written_reads_back_the_same(value: Any) -> None:
    # integers past 64 bits (which orjson refuses) included: st.integers() draws them
    assert json.loads(compact(value)) == value


def test_integers_past_64_bits_and_non_json_values_through_default() -> None:
    assert json.loads(compact({"n": 2**70, "id": b"\x01\xff"}, default=lambda b: b.hex())) == {"n": 2**70, "id": "01ff"}


def test_times_are_written_by_default_as_the_standard_library_would() -> None:
    from datetime import UTC, date, datetime, timedelta, timezone

    odd = datetime(1900, 1, 1, 12, tzinfo=timezone(timedelta(minutes=19, seconds=32)))  # Amsterdam, 1900
    values = {"at": datetime(2026, 12, 7, 12, 0, 0, 123456, tzinfo=UTC), "odd": odd, "day": date(2026, 12, 7)}
    assert json.loads(compact(values, default=lambda v: v.isoformat())) == {k: v.isoformat() for k, v in values.items()}
