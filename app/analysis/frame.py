"""The analysis frame: one row per complete response, item codes and derived variables as columns.

Built by one streaming query that pulls each item out of the stored raw answers (JSONB) and
the derived values beside them; rows whose derived values were computed under older
definitions are recomputed from the codebook in force. Participants appear as study-salted
pseudonyms, never as external ids.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy.orm import Session

from app.analysis import repository
from app.instruments.codebook import Codebook
from app.responses.validation import carried_values, compute_derived

ID_COLUMNS = ("participant", "wave", "completed_at")


def columns_of(codebook: Codebook) -> tuple[list[str], list[str]]:
    return list(codebook.items), [d.code for d in codebook.derived]


def data_fingerprint(session: Session, study_id: uuid.UUID, codebook: Codebook, revision: int | None,
                     as_of: datetime | None) -> str:
    """A cheap fingerprint of everything a fit reads: if it is unchanged, so is the snapshot."""
    count, digest = repository.complete_digest(session, study_id, as_of)
    raw = f"{count}:{digest}:{revision}:{codebook.sha256}:{as_of.isoformat() if as_of else '-'}"
    return hashlib.sha256(raw.encode()).hexdigest()


def _typed(values: list[Any], kind: str) -> pd.Series:
    if kind == "boolean":
        return pd.Series([None if v is None else v == "true" for v in values], dtype="boolean")
    if kind == "integer":
        return pd.Series(pd.to_numeric(pd.Series(values, dtype="object"), errors="coerce")).astype("Int64")
    if kind == "number":
        return pd.Series(pd.to_numeric(pd.Series(values, dtype="object"), errors="coerce"), dtype="float64")
    return pd.Series(values, dtype="string")


def load(session: Session, study_id: uuid.UUID, codebook: Codebook, pseudonymise: Callable[[str], str], *,
         as_of: datetime | None = None, batch: int = 20_000) -> pd.DataFrame:
    items, derived = columns_of(codebook)
    rows = repository.frame_rows(session, study_id, items, derived, codebook.derived_signature, as_of=as_of,
                                 batch=batch)
    n_fixed = 5
    transposed: list[tuple[Any, ...]] = list(zip(*rows, strict=True)) if rows else [()] * (n_fixed + len(items)
                                                                                           + len(derived))
    names: dict[str, str] = {}
    for pid, ext in zip(transposed[0], transposed[1], strict=True):
        if pid not in names:
            names[pid] = pseudonymise(ext)
    columns: dict[str, list[Any]] = {
        "participant": [names[pid] for pid in transposed[0]],
        "wave": list(transposed[2]),
        "completed_at": list(transposed[3]),
        **{code: list(transposed[n_fixed + j]) for j, code in enumerate(items)},
        **{code: list(transposed[n_fixed + len(items) + j]) for j, code in enumerate(derived)},
    }
    stale = [i for i, answers in enumerate(transposed[4]) if answers is not None]
    if stale:
        raw_answers = {i: (str(transposed[0][i]), transposed[2][i], transposed[4][i]) for i in stale}
        _recompute(columns, stale, raw_answers, codebook, derived)
    kinds = {code: item.type for code, item in codebook.items.items()}
    kinds.update({d.code: d.type for d in codebook.derived})
    frame = pd.DataFrame({
        "participant": pd.Series(columns["participant"], dtype="string"),
        "wave": pd.Series(columns["wave"], dtype="string"),
        "completed_at": pd.to_datetime(pd.Series(columns["completed_at"], dtype="object"), utc=True),
        **{code: _typed(columns[code], kinds[code]) for code in (*items, *derived)},
    })
    return frame


def _recompute(columns: dict[str, list[Any]], stale: list[int], raw: dict[int, tuple[str, str, dict[str, Any]]],
               codebook: Codebook, derived: list[str]) -> None:
    """Rows computed under older definitions: derive again, source waves first for carried values."""
    by_participant: dict[str, dict[str, dict[str, Any]]] = {}
    for i in stale:
        pid, wave, answers = raw[i]
        by_participant.setdefault(pid, {})[wave] = answers
    order = {w: k for k, w in enumerate(codebook.wave_keys)}
    values: dict[tuple[str, str], dict[str, Any]] = {}
    for pid, waves in by_participant.items():
        done: dict[str, dict[str, Any]] = {}
        for wave in sorted(waves, key=lambda w: order.get(w, 99)):
            done[wave] = compute_derived(codebook, wave, waves[wave], carried_values(codebook, wave, done))
            values[(pid, wave)] = done[wave]
    for i in stale:
        pid, wave, _ = raw[i]
        for code in derived:
            v = values[(pid, wave)].get(code)
            columns[code][i] = None if v is None else (json.dumps(v) if isinstance(v, bool) else str(v))


def snapshot_sha256(frame: pd.DataFrame) -> str:
    """Content hash of the frame: columns, types and every value, independent of memory layout."""
    digest = hashlib.sha256()
    digest.update(json.dumps([(c, str(t)) for c, t in frame.dtypes.items()]).encode())
    hashed = pd.util.hash_pandas_object(frame, index=False, categorize=False).to_numpy(dtype=np.uint64)
    digest.update(hashed.tobytes())
    return digest.hexdigest()


def to_parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer, compression="zstd")
    return buffer.getvalue()


def from_parquet(data: bytes) -> pd.DataFrame:
    frame: pd.DataFrame = pq.read_table(io.BytesIO(data)).to_pandas()
    return frame
