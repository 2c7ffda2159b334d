"""De-identified exports: CSV or Parquet, one row per participant-wave (long) or per participant (wide).

Text answers that a spreadsheet would run as a formula (starting with =, +, -, @, tab or CR) are
written with a leading apostrophe in CSV, as OWASP advises; `raw_cells=True` turns that off for
analysts who read the file with code. Parquet is typed data and always raw.

Item codes and derived variables are the columns, selected by the responses domain's one bulk
reader (`app.responses.table`, which the analysis frame reads through too); participants appear
as the study's HMAC pseudonym; there is no contact data and no external id. Everything streams:
CSV straight from PostgreSQL's COPY ... TO STDOUT, Parquet one row group at a time, so a
million rows pass through in flat memory.
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.orm import Session

from app.core.crypto import Pseudonymiser, Sealer
from app.core.db import Database
from app.instruments.codebook import Codebook
from app.responses import service as responses
from app.responses import table
from app.sites import service as sites
from app.studies.service import StudyContext, date_shifter, export_dates, pseudonymiser

PARQUET_BATCH = 10_000
MEDIA = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}


@dataclass(frozen=True)
class Export:
    body: Iterator[bytes]
    media_type: str
    filename: str


def export(session: Session, db: Database, study: StudyContext, sealer: Sealer, *, format: str, layout: str,
           raw_cells: bool = False, dates: str | None = None) -> Export:
    """A study's de-identified export, ready to stream (for the API and the dashboard alike).
    Everything that can be refused is refused here, before the first byte. `dates`: exact, shifted
    or year (None: the study's default)."""
    codebook = study.require_codebook()
    table.query(codebook, layout)
    responses.bring_derived_current(session, study)
    pseudonymise = pseudonymiser(session, study.study, sealer)
    scope = scope_of(session, study, sealer, dates)
    if format == "csv":
        body = stream_csv(db, study.study.id, codebook, pseudonymise, layout, raw_cells=raw_cells, scope=scope)
    else:
        body = stream_parquet(db, study.study.id, codebook, pseudonymise, layout, scope=scope)
    return Export(body, MEDIA[format], f"{study.study.key}-{layout}.{format}")


@dataclass(frozen=True)
class Scope:
    """Which participants an export holds, whether it names their site, and how it writes dates:
    `exact`; `shifted` by each participant's own number of days (`shift_pads`: the HMAC pads of the
    study's date-shift key, see DateShifter), so intervals between a participant's dates stay exact;
    or `year` only."""

    site_id: uuid.UUID | None = None
    site_column: bool = False
    dates: str = "exact"
    shift_pads: tuple[bytes, bytes] | None = None

    def query(self, codebook: Codebook, layout: str, **options: Any) -> tuple[sql.Composable, list[table.Column]]:
        return table.query(codebook, layout, one_site=self.site_id is not None, site_column=self.site_column,
                           dates=self.dates, **options)

    def params(self, study_id: Any, pseudonymiser: Pseudonymiser) -> dict[str, Any]:
        return table.params(study_id, pseudonymiser, site_id=self.site_id, shift_pads=self.shift_pads)


def scope_of(session: Session, study: StudyContext, sealer: Sealer, dates: str | None) -> Scope:
    """A study with sites gets a `site` column (the key); a site-scoped request, its site's rows only."""
    chosen = dates or export_dates(study.study)
    return Scope(site_id=study.site_id, site_column=bool(sites.keys_of(session, study.study.id)), dates=chosen,
                 shift_pads=date_shifter(session, study.study, sealer).sql_pads() if chosen == "shifted" else None)


DATES_NOTE = {
    "shifted": "dates shifted by a per-participant number of days (between -180 and 180, never 0; the same in "
               "every export), so intervals between a participant's dates are exact",
    "year": "dates reduced to their year (HIPAA Safe Harbor style)",
}


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def neutralise(value: Any, *, numbers_are_data: bool = False) -> Any:
    """OWASP's CSV injection defence: a text cell a spreadsheet would run as a formula gets a
    leading `'` (the native export does the same in SQL, `table._value`). `numbers_are_data`: a cell
    that is a plain number (-3, +1.5) stays as it is, for the REDCap CSV, where every value is text."""
    if not isinstance(value, str) or not value.startswith(FORMULA_START):
        return value
    return value if numbers_are_data and _PLAIN_NUMBER.fullmatch(value) else "'" + value


def stream_csv(db: Database, study_id: Any, codebook: Codebook, pseudonymiser: Pseudonymiser, layout: str,
               chunk: int = 1 << 16, *, raw_cells: bool = False, scope: Scope = Scope()) -> Iterator[bytes]:
    statement, _ = scope.query(codebook, layout, inert=not raw_cells)
    copy = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER)").format(statement)
    with db.sessions() as session:  # a session of its own: the request's is closed once streaming starts
        raw = session.connection().connection.dbapi_connection
        assert isinstance(raw, psycopg.Connection)
        buffer = bytearray()
        with raw.cursor() as cur, cur.copy(copy, scope.params(study_id, pseudonymiser)) as stream:
            for data in stream:
                buffer += data
                if len(buffer) >= chunk:
                    yield bytes(buffer)
                    buffer.clear()
        if buffer:
            yield bytes(buffer)


class _Drain(io.RawIOBase):
    """A write-only sink for ParquetWriter whose bytes are taken away as they are written."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.parts.append(chunk)
        self.position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self.position

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def _schema(cols: list[table.Column], layout: str, scope: Scope = Scope()) -> Any:
    import pyarrow as pa

    category = pa.dictionary(pa.int32(), pa.string())
    year = scope.dates == "year"
    arrow = {"integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_(),
             "date": pa.int64() if year else pa.date32(), "single_choice": category}
    fields = [pa.field("participant", pa.string())]
    if scope.site_column:
        fields.append(pa.field("site", category))
    if layout == "long":
        fields += [pa.field("wave", category),
                   pa.field("completed_at", pa.int64() if year else pa.timestamp("us", tz="UTC")),
                   pa.field("late", pa.bool_())]
    fields += [pa.field(c.name, arrow.get(c.type, pa.string())) for c in cols]
    return pa.schema(fields)


def _array(values: tuple[Any, ...], kind: Any) -> Any:
    import pyarrow as pa

    if pa.types.is_string(kind):
        return pa.array(values, type=kind)
    if pa.types.is_dictionary(kind):
        return pa.array(values, type=pa.string()).dictionary_encode()
    if pa.types.is_timestamp(kind) or (pa.types.is_boolean(kind) and any(isinstance(v, bool) for v in values)):
        return pa.array(values, type=kind)  # columns the query already types (completed_at, late)
    return pa.array(values, type=pa.string()).cast(kind)  # text from JSON ("3", "true", "2026-01-31"): cast


def _batch(rows: list[tuple[Any, ...]], schema: Any) -> Any:
    import pyarrow as pa

    columns = zip(*rows, strict=False)  # one pass over the rows; no per-column copies of them
    return pa.Table.from_arrays([_array(values, field.type) for values, field in zip(columns, schema, strict=True)],
                                schema=schema)


def stream_parquet(db: Database, study_id: Any, codebook: Codebook, pseudonymiser: Pseudonymiser,
                   layout: str, *, scope: Scope = Scope()) -> Iterator[bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    statement, cols = scope.query(codebook, layout, typed=True)
    schema = _schema(cols, layout, scope)
    sink = _Drain()
    writer = pq.ParquetWriter(pa.PythonFile(sink, mode="w"), schema, compression="zstd")
    with db.sessions() as session:
        raw = session.connection().connection.dbapi_connection
        assert isinstance(raw, psycopg.Connection)
        with raw.cursor(name="cohort_export") as cur:  # server-side cursor: rows arrive in batches
            cur.itersize = PARQUET_BATCH
            cur.execute(statement, scope.params(study_id, pseudonymiser))
            while rows := cur.fetchmany(PARQUET_BATCH):
                writer.write_table(_batch(rows, schema))
                del rows
                yield sink.take()
    writer.close()
    yield sink.take()


class _InertWriter:
    """csv.writer whose text cells are neutralised for spreadsheets."""

    def __init__(self, out: io.StringIO) -> None:
        self.writer = csv.writer(out, lineterminator="\n")

    def writerow(self, row: list[Any]) -> None:
        self.writer.writerow([neutralise(v) for v in row])


def dictionary_csv(codebook: Codebook, scope: Scope = Scope()) -> str:
    """The codebook as a data dictionary: one row per item and derived variable, and (for a study with
    sites, or dates not exact) the export's own columns that say so."""
    out = io.StringIO()
    writer = _InertWriter(out)
    writer.writerow(["variable", "kind", "instrument", "type", "label", "options", "min", "max", "required",
                     "waves", "enable_when", "definition"])
    note = DATES_NOTE.get(scope.dates, "")
    if scope.site_column:
        writer.writerow(["site", "export", "", "text", "Site", "", "", "", "", "", "",
                         "the key of the participant's site"])
    if note:
        writer.writerow(["completed_at", "export", "", "integer" if scope.dates == "year" else "datetime",
                         "Completed at", "", "", "", "", ";".join(codebook.wave_keys), "", note])
    for instrument in codebook.document["instruments"]:
        for item in instrument["items"]:
            condition = item.get("enable_when")
            writer.writerow([
                item["code"], "item", instrument["key"], item["type"], item["label"],
                " | ".join(f"{o['code']}={o['label']}" for o in item.get("options", [])),
                item.get("min", ""), item.get("max", ""), str(item.get("required", False)).lower(),
                ";".join(item["waves"]),
                f"{condition['item']} {condition['operator']} {condition['value']}" if condition else "",
                note if item["type"] == "date" else "",
            ])
    for d in codebook.document.get("derived", []):
        writer.writerow([d["code"], "derived", "", d["type"], "", "", "", "", "", ";".join(codebook.wave_keys), "",
                         d["definition"]])
    return out.getvalue()
