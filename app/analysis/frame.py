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


def load(session: Session, ctx: StudyContext, pseudonymiser: Pseudonymiser, *,
         as_of: datetime | None = None) -> pd.DataFrame:
    """The frame of a study's complete responses (completed by `as_of`, when given), derived values
    as stored: the caller brings them up to date first (`responses.service.bring_derived_current`)."""
    codebook = ctx.require_codebook()
    statement, cols = table.query(codebook, "long", with_late=False, until=as_of is not None,
                                  ordered=False)
    copy = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER)").format(statement)
    raw = session.connection().connection.dbapi_connection
    assert isinstance(raw, psycopg.Connection)
    buffer = io.BytesIO()
    with raw.cursor() as cur, cur.copy(copy, table.params(ctx.study.id, pseudonymiser, as_of)) as stream:
        for data in stream:
            buffer.write(data)
    frame = parse(buffer.getvalue(), cols)
    order = frame["wave"].map({w: i for i, w in enumerate(codebook.wave_keys)})
    keys = frame[["participant"]].assign(_w=order)
    return frame.iloc[keys.sort_values(["participant", "_w"], kind="mergesort").index].reset_index(drop=True)


def parse(data: bytes, cols: list[table.Column]) -> pd.DataFrame:
    """The reader's long-layout CSV as typed columns: integers as Int64, booleans as boolean,
    numbers as float64, completed_at as UTC timestamps, the rest (codes, text) as strings. A
    missing value is null; an empty text answer stays an empty string."""
    types = {"participant": pa.string(), "wave": pa.string(), "completed_at": pa.timestamp("us", tz="UTC"),
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
    hashed = pd.util.hash_pandas_object(frame, index=False, categorize=False).to_numpy(dtype=np.uint64)
    digest.update(hashed.tobytes())
    return digest.hexdigest()


def to_parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer, compression="zstd")
    return buffer.getvalue()


def from_parquet(data: bytes) -> pd.DataFrame:
    frame: pd.DataFrame = pq.read_table(io.BytesIO(data)).to_pandas(types_mapper=PANDAS_TYPES.get)
    return frame
