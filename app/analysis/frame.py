"""The analysis frame: one row per complete response, item codes and derived variables as columns.

Read through the responses domain's one bulk reader (`app.responses.table`, the same SELECT the
exports run), streamed out of PostgreSQL with COPY and parsed by Arrow's CSV reader into typed
columns: no value passes through a Python object on the way. Derived values computed under
older definitions are brought up to date before it is read (as before an export), so the frame,
an export and a single response read agree. Participants appear as study-salted pseudonyms, never as external ids.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from psycopg import sql
from sqlalchemy.orm import Session

from app.core.crypto import Pseudonymiser
from app.responses import table
from app.studies.service import StudyContext

# integers are parsed as float64 and then made Int64, so a stored 3.0 reads as 3 (a fraction is an error)
ARROW_TYPES = {"integer": pa.float64(), "number": pa.float64(), "boolean": pa.bool_()}
# strings in Python storage: a fit iterates participants and codes, which Arrow-backed strings make slow
PANDAS_TYPES = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype(), pa.string(): pd.StringDtype("python")}


# the columns that key a frame's rows to stored responses (kept beside the frame, never in it)
KEYS = ["response_id", "row_version"]
# past this share of changed rows a whole read is cheaper than picking rows out of the last frame
WHOLE_READ_SHARE = 0.3


@dataclass(frozen=True)
class Keyed:
    """A frame and, row for row, the response id and version each row was read at."""

    frame: pd.DataFrame
    keys: pd.DataFrame


def _copy(session: Session, statement: sql.Composable, params: dict[str, object]) -> bytes:
    raw = session.connection().connection.dbapi_connection
    assert isinstance(raw, psycopg.Connection)
    buffer = io.BytesIO()
    copy = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER)").format(statement)
    with raw.cursor() as cur, cur.copy(copy, params) as stream:
        for data in stream:
            buffer.write(data)
    return buffer.getvalue()


def versions(session: Session, study_id: uuid.UUID, as_of: datetime | None) -> pd.DataFrame:
    """Every complete response's id and row version now (`table.versions_query`)."""
    raw = session.connection().connection.dbapi_connection
    assert isinstance(raw, psycopg.Connection)
    with raw.cursor() as cur:
        row = cur.execute(table.versions_query(until=as_of is not None), {"study": study_id, "until": as_of}).fetchone()
    assert row is not None
    read = pa_csv.read_csv(io.BytesIO(row[0].encode()), convert_options=pa_csv.ConvertOptions(
        column_types={"response_id": pa.string(), "row_version": pa.int64()}))
    return as_keys(read.to_pandas(types_mapper=PANDAS_TYPES.get))


def as_keys(keys: pd.DataFrame) -> pd.DataFrame:
    """Keys with plain int64 versions (never missing), however they were read."""
    return keys.astype({"row_version": "int64"})


def read(session: Session, ctx: StudyContext, pseudonymiser: Pseudonymiser, *, as_of: datetime | None = None,
         only: list[uuid.UUID] | None = None) -> Keyed:
    """The frame of a study's complete responses (completed by `as_of`, when given; only the
    responses `only` names, when given) with its keys, derived values as stored: the caller brings
    them up to date first (`responses.service.bring_derived_current`)."""
    codebook = ctx.require_codebook()
    statement, cols = table.query(codebook, "long", with_late=False, until=as_of is not None, ordered=False,
                                  keyed=True, only=only is not None)
    frame = parse(_copy(session, statement, table.params(ctx.study.id, pseudonymiser, as_of, ids=only)), cols,
                  keyed=True)
    return _ordered(Keyed(frame.drop(columns=KEYS), as_keys(frame[KEYS])), codebook.wave_keys)


def refresh(session: Session, ctx: StudyContext, pseudonymiser: Pseudonymiser, *, as_of: datetime | None,
            now: pd.DataFrame, base: Keyed | None) -> Keyed:
    """The frame for the data whose versions are `now` (from `versions`): the rows of `base` (a
    frame read earlier on the same basis) whose versions still hold, and the others read from the
    database; a whole read when there is no base or most rows changed. The result equals a whole
    read, row for row (rows changed after `now` was taken are read as they are, with their versions)."""
    if base is None:
        return read(session, ctx, pseudonymiser, as_of=as_of)
    held = base.keys.reset_index(drop=True)
    joined = now.merge(held, on="response_id", how="left", suffixes=("", "_base"))
    stale = joined.loc[joined["row_version"] != joined["row_version_base"], "response_id"]
    if len(stale) > WHOLE_READ_SHARE * max(len(now), 1):
        return read(session, ctx, pseudonymiser, as_of=as_of)
    keep = held["response_id"].isin(now["response_id"]) & ~held["response_id"].isin(stale)
    kept = Keyed(base.frame.loc[keep.to_numpy()], held.loc[keep])
    if stale.empty:
        fresh = None
    else:
        fresh = read(session, ctx, pseudonymiser, as_of=as_of, only=[uuid.UUID(str(i)) for i in stale])
    parts = [kept] if fresh is None else [kept, fresh]
    merged = Keyed(pd.concat([p.frame for p in parts], ignore_index=True),
                   pd.concat([p.keys for p in parts], ignore_index=True))
    return _ordered(merged, ctx.require_codebook().wave_keys)


def _ordered(keyed: Keyed, wave_keys: tuple[str, ...]) -> Keyed:
    """Rows by participant, then wave in codebook order (a row's place never depends on read order)."""
    frame = keyed.frame
    order = frame["wave"].map({w: i for i, w in enumerate(wave_keys)})
    by = frame[["participant"]].assign(_w=order).reset_index(drop=True)
    index = by.sort_values(["participant", "_w"], kind="mergesort").index
    return Keyed(frame.iloc[index].reset_index(drop=True), keyed.keys.iloc[index].reset_index(drop=True))


def parse(data: bytes, cols: list[table.Column], *, keyed: bool = False) -> pd.DataFrame:
    """The reader's long-layout CSV as typed columns: integers as Int64, booleans as boolean,
    numbers as float64, completed_at as UTC timestamps, the rest (codes, text) as strings. A
    missing value is null; an empty text answer stays an empty string."""
    keys = {"response_id": pa.string(), "row_version": pa.int64()} if keyed else {}
    types = {**keys, "participant": pa.string(), "wave": pa.string(), "completed_at": pa.timestamp("us", tz="UTC"),
             **{c.name: ARROW_TYPES.get(c.type, pa.string()) for c in cols}}
    options = pa_csv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=True,
                                    quoted_strings_can_be_null=False, true_values=["true"], false_values=["false"])
    parsed = pa_csv.read_csv(io.BytesIO(data), convert_options=options)
    frame: pd.DataFrame = parsed.to_pandas(types_mapper=PANDAS_TYPES.get)
    for c in cols:
        if c.type == "integer":
            frame[c.name] = frame[c.name].astype("Int64")
    return frame


def snapshot_sha256(frame: pd.DataFrame) -> str:
    """Content hash of the frame: columns, types and every value, independent of memory layout."""
    digest = hashlib.sha256()
    digest.update(json.dumps([(c, str(t)) for c, t in frame.dtypes.items()]).encode())
    # categorize: each distinct value hashed once (codes repeat across rows)
    hashed = pd.util.hash_pandas_object(frame, index=False, categorize=True).to_numpy(dtype=np.uint64)
    digest.update(hashed.tobytes())
    return digest.hexdigest()


def to_parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer, compression="zstd")
    return buffer.getvalue()


def from_parquet(data: bytes) -> pd.DataFrame:
    frame: pd.DataFrame = pq.read_table(io.BytesIO(data)).to_pandas(types_mapper=PANDAS_TYPES.get)
    return frame


# The frames this process read or kept last, by snapshot sha256 (content-addressed, so never stale):
# a refit after new data starts from the last frame without reading its Parquet again.
_recent: OrderedDict[str, Keyed] = OrderedDict()
RECENT = 2


def remember(sha: str, keyed: Keyed) -> None:
    _recent[sha] = keyed
    _recent.move_to_end(sha)
    while len(_recent) > RECENT:
        _recent.popitem(last=False)


def recall(sha: str) -> Keyed | None:
    """A frame kept in this process (a shallow copy: pandas copies on write, so a caller's changes
    never reach the kept one)."""
    found = _recent.get(sha)
    return None if found is None else Keyed(found.frame.copy(deep=False), found.keys.copy(deep=False))
