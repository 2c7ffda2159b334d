"""Reading a participant import: a CSV file or a JSON array of the objects POST /participants takes.

Rows are numbered from 1 (for CSV, the first data row after the header). Every problem
is reported with its row, the field and a code; nothing is stored unless the caller asks
for a partial import or there are no problems at all.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from pydantic import TypeAdapter, ValidationError

from app.core.errors import Invalid, Malformed
from app.participants.schemas import ImportError_, ParticipantIn
from app.participants.service import ImportRow

CSV_COLUMNS = ("external_id", "enrolled_at", "timezone", "language", "email", "phone", "name", "site")
REQUIRED_COLUMNS = ("external_id", "enrolled_at")
CONTACT_FIELDS = ("email", "phone", "name")

_many = TypeAdapter(list[ParticipantIn])


def read_csv(raw: bytes) -> tuple[list[dict[str, Any]], bool]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Malformed("the CSV file is not UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        raise Invalid("the CSV file is empty", errors=[{"loc": ["header"], "code": "missing", "message": "no header"}])
    header = [h.strip() for h in header]
    unknown = [h for h in header if h not in CSV_COLUMNS]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if unknown or missing:
        problems = [{"loc": ["header", h], "code": "unknown_column", "message": f"unknown column {h!r}"}
                    for h in unknown]
        problems += [{"loc": ["header", c], "code": "missing", "message": f"column {c!r} is required"}
                     for c in missing]
        raise Invalid(f"the CSV header must use the columns {', '.join(CSV_COLUMNS)}", errors=problems)
    records = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        row = {h: (v.strip() or None) for h, v in zip(header, values, strict=False)}
        contact = {k: row.pop(k) for k in CONTACT_FIELDS if k in row}
        record: dict[str, Any] = {k: v for k, v in row.items() if v is not None}
        if len(values) != len(header):
            record["__width__"] = len(values)
        if any(v is not None for v in contact.values()):
            record["contact"] = {k: v for k, v in contact.items() if v is not None}
        records.append(record)
    return records, True


def read_json(raw: bytes) -> tuple[list[dict[str, Any]], bool]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Malformed("the request body is not valid JSON") from None
    if not isinstance(data, list):
        raise Invalid("expected a JSON array of participants",
                      errors=[{"loc": [], "code": "type", "message": "expected an array"}])
    return data, False


def _flat_loc(loc: tuple[Any, ...], csv_mode: bool) -> list[str | int]:
    parts = list(loc)
    if csv_mode and parts[:1] == ["contact"] and len(parts) > 1:
        parts = parts[1:]
    return parts


def validate(records: list[Any], *, csv_mode: bool) -> tuple[list[ImportRow], list[ImportError_]]:
    width_errors = [
        ImportError_(row=i, loc=[], code="columns", message=f"{r['__width__']} values for {len(CSV_COLUMNS)} columns")
        for i, r in enumerate(records, start=1) if isinstance(r, dict) and "__width__" in r
    ]
    cleaned = [{k: v for k, v in r.items() if k != "__width__"} if isinstance(r, dict) else r for r in records]
    if not width_errors:
        try:
            parsed = _many.validate_python(cleaned)  # one pass in the common all-valid case
            return [ImportRow(i, p) for i, p in enumerate(parsed, start=1)], []
        except ValidationError:
            pass
    rows: list[ImportRow] = []
    errors = list(width_errors)
    for i, record in enumerate(cleaned, start=1):
        try:
            rows.append(ImportRow(i, ParticipantIn.model_validate(record)))
        except ValidationError as exc:
            for e in exc.errors(include_url=False):
                errors.append(ImportError_(row=i, loc=_flat_loc(e["loc"], csv_mode), code=e["type"], message=e["msg"]))
    bad = {e.row for e in width_errors}
    return [r for r in rows if r.row not in bad], errors
