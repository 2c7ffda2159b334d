"""The one bulk reader of stored responses: the SQL that turns complete responses into columns.

Exports (CSV, Parquet) and the analysis frame both select through `query`, so an item or a
derived value reads the same in a downloaded file as in the data a model is fitted on. Derived
values are the stored ones; callers first bring rows computed under older definitions up to date
(`service.bring_derived_current`), so no reader recomputes on its own. Participants appear as
the study's HMAC pseudonym, computed in SQL from RFC 2104's inner and outer keys; there is no
contact data and no external id.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql

from app.core.crypto import Pseudonymiser
from app.core.errors import Invalid
from app.instruments.codebook import Codebook


@dataclass(frozen=True)
class Column:
    name: str
    source: str  # "answers" or "derived"
    code: str
    type: str
    wave: str | None = None  # wide layout: the wave this column holds


def columns(codebook: Codebook, layout: str) -> list[Column]:
    items = [Column(code, "answers", code, item.type) for code, item in codebook.items.items()]
    derived = [Column(d.code, "derived", d.code, d.type) for d in codebook.derived]
    if layout == "long":
        return [*items, *derived]
    out = []
    for wave in codebook.wave_keys:
        out += [Column(f"{c.code}_{wave}", c.source, c.code, c.type, wave) for c in items
                if wave in codebook.items[c.code].waves]
        out += [Column(f"{c.code}_{wave}", c.source, c.code, c.type, wave) for c in derived]
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise Invalid("wide column names collide in this codebook; use the long layout", errors=[
            {"loc": ["query", "layout"], "code": "layout", "message": "item and wave names collide"}])
    return out


def _value(column: Column, alias: str = "r", *, inert: bool = False) -> sql.Composable:
    field = sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(column.source))
    if column.type == "multi_choice":
        return sql.SQL("(SELECT string_agg(x, ';') FROM jsonb_array_elements_text({} -> {}) AS x)").format(
            field, sql.Literal(column.code))
    value = sql.SQL("{} ->> {}").format(field, sql.Literal(column.code))
    if inert and column.type == "text":  # only free text can start with a formula; codes and numbers cannot
        return sql.SQL("(SELECT CASE WHEN left(v, 1) IN ('=', '+', '-', '@', chr(9), chr(13)) THEN {} || v "
                       "ELSE v END FROM (SELECT {} AS v) AS cell)").format(sql.Literal("'"), value)
    return value


def _pseudonym(alias: str = "p") -> sql.Composable:
    return sql.SQL(
        "left(encode(sha256(%(outer)s || sha256(%(inner)s || convert_to({}.external_id, 'UTF8'))), 'hex'), {})"
    ).format(sql.Identifier(alias), sql.Literal(16))


TEXT_TIME = "to_char(r.completed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"


def query(codebook: Codebook, layout: str, *, inert: bool = False, typed: bool = False, with_late: bool = True,
          until: bool = False, ordered: bool = True) -> tuple[sql.Composable, list[Column]]:
    """The SELECT of a study's complete responses. `inert`: free-text cells neutralised for
    spreadsheets (CSV); `typed`: timestamps as timestamps (Parquet) rather than RFC 3339 text
    (whole seconds); `with_late`: the long layout's `late`
    column; `until`: only responses completed by the `until` parameter; `ordered`: by participant
    and wave (a reader that sorts on its own saves the database a sort of wide rows). Booleans are
    spelled true/false everywhere in text, as the derived values are."""
    cols = columns(codebook, layout)
    wave_order = sql.SQL("array_position({}::text[], r.wave)").format(sql.Literal(list(codebook.wave_keys)))
    source: sql.Composable = sql.SQL(
        "FROM responses r JOIN participants p ON p.id = r.participant_id "
        "WHERE r.study_id = %(study)s AND r.status = 'complete'"
    )
    if until:
        source = sql.SQL("{} AND r.completed_at <= %(until)s").format(source)
    if layout == "long":
        completed = "r.completed_at" if typed else TEXT_TIME
        late = [sql.SQL("r.late") if typed else sql.SQL("CASE WHEN r.late THEN 'true' ELSE 'false' END AS late")]
        select = sql.SQL(", ").join([
            sql.SQL("{} AS participant").format(_pseudonym()), sql.SQL("r.wave"),
            sql.SQL(completed + " AS completed_at"),
            *(late if with_late else []),
            *[sql.SQL("{} AS {}").format(_value(c, inert=inert), sql.Identifier(c.name)) for c in cols],
        ])
        order = sql.SQL(" ORDER BY 1, {}").format(wave_order) if ordered else sql.SQL("")
        return sql.SQL("SELECT {} {}{}").format(select, source, order), cols
    # wide: one row per participant, one column per (item, wave) the codebook asks
    select = sql.SQL(", ").join([
        sql.SQL("{} AS participant").format(_pseudonym()),
        *[sql.SQL("max({}) FILTER (WHERE r.wave = {}) AS {}").format(_value(c, inert=inert), sql.Literal(c.wave),
                                                                      sql.Identifier(c.name)) for c in cols],
    ])
    statement = sql.SQL("SELECT {} {} GROUP BY p.id, p.external_id ORDER BY 1").format(select, source)
    return statement, cols


def params(study_id: Any, pseudonymiser: Pseudonymiser, until: datetime | None = None) -> dict[str, Any]:
    inner, outer = pseudonymiser.sql_pads()
    return {"study": study_id, "inner": inner, "outer": outer, "until": until}
