"""The one bulk reader of stored responses: the SQL that turns complete responses into columns.

Exports (CSV, Parquet) and the analysis frame both select through `query`, so an item or a
derived value reads the same in a downloaded file as in the data a model is fitted on. Derived
values are the stored ones; callers first bring rows computed under older definitions up to date
(`service.bring_derived_current`), so no reader recomputes on its own. Participants appear as
the study's HMAC pseudonym, computed in SQL from RFC 2104's inner and outer keys; there is no
contact data and no external id.
"""

from __future__ import annotations

import uuid
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


_ISO_DATE = "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
# The participant's shift in days for `dates="shifted"`, computed in SQL as app.core.crypto.DateShifter
# does in Python: HMAC-SHA256 of the participant id's 16 bytes under the study's date-shift key (its
# pads are parameters), first 32 bits, mod 360, mapped onto [-180, -1] and [1, 180].
_SHIFT_JOIN = sql.SQL(
    " CROSS JOIN LATERAL (SELECT CASE WHEN v < 180 THEN v - 180 ELSE v - 179 END AS days FROM (SELECT "
    "((('x' || left(encode(sha256(%(shift_outer)s || sha256(%(shift_inner)s || uuid_send(p.id))), 'hex'), 8))"
    "::bit(32)::bigint %% 360)::int) AS v) AS raw) AS sh")


def _value(column: Column, alias: str = "r", *, inert: bool = False, dates: str = "exact") -> sql.Composable:
    field = sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(column.source))
    if column.type == "multi_choice":
        return sql.SQL("(SELECT string_agg(x, ';') FROM jsonb_array_elements_text({} -> {}) AS x)").format(
            field, sql.Literal(column.code))
    value = sql.SQL("{} ->> {}").format(field, sql.Literal(column.code))
    if column.type == "date" and dates == "shifted":  # a stored date is valid YYYY-MM-DD (validation says so)
        return sql.SQL("(SELECT CASE WHEN v ~ {} THEN to_char(v::date + sh.days, 'YYYY-MM-DD') END "
                       "FROM (SELECT {} AS v) AS cell)").format(sql.Literal(_ISO_DATE), value)
    if column.type == "date" and dates == "year":
        return sql.SQL("(SELECT CASE WHEN v ~ {} THEN left(v, 4) END FROM (SELECT {} AS v) AS cell)").format(
            sql.Literal(_ISO_DATE), value)
    if inert and column.type == "text":  # only free text can start with a formula; codes and numbers cannot
        return sql.SQL("(SELECT CASE WHEN left(v, 1) IN ('=', '+', '-', '@', chr(9), chr(13)) THEN {} || v "
                       "ELSE v END FROM (SELECT {} AS v) AS cell)").format(sql.Literal("'"), value)
    return value


def _pseudonym(alias: str = "p") -> sql.Composable:
    return sql.SQL(
        "left(encode(sha256(%(outer)s || sha256(%(inner)s || convert_to({}.external_id, 'UTF8'))), 'hex'), {})"
    ).format(sql.Identifier(alias), sql.Literal(16))


# A stored row's version: changes with every UPDATE of the row (its transaction id), whatever the
# writer touched (answers, derived values carried from another wave, status). An analysis frame
# keeps each row's version, so a later read fetches only the rows whose version moved.
ROW_VERSION = "hashtextextended(r.id::text || ':' || r.xmin::text, 0)"

TEXT_TIME = "to_char(r.completed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"


def query(codebook: Codebook, layout: str, *, inert: bool = False, typed: bool = False, with_late: bool = True,
          until: bool = False, ordered: bool = True, one_site: bool = False, site_column: bool = False,
          dates: str = "exact", keyed: bool = False, only: bool = False) -> tuple[sql.Composable, list[Column]]:
    """The SELECT of a study's complete responses. `inert`: free-text cells neutralised for
    spreadsheets (CSV); `typed`: timestamps as timestamps (Parquet) rather than RFC 3339 text
    (whole seconds); `with_late`: the long layout's `late`
    column; `until`: only responses completed by the `until` parameter; `ordered`: by participant
    and wave (a reader that sorts on its own saves the database a sort of wide rows); `one_site`: only
    the participants of the `site` parameter's site; `site_column`: a `site` column (the site's key);
    `dates`: `exact`, `shifted` (each participant's dates and timestamps moved by its own number of
    days, from the `shift_inner`/`shift_outer` parameters) or `year` (years only); `keyed` (long
    layout): first the `response_id` and `row_version` columns (`ROW_VERSION`); `only`: just the
    responses whose ids are in the `ids` parameter. Booleans are spelled true/false everywhere in
    text, as the derived values are."""
    cols = columns(codebook, layout)
    wave_order = sql.SQL("array_position({}::text[], r.wave)").format(sql.Literal(list(codebook.wave_keys)))
    source: sql.Composable = sql.SQL(
        "FROM responses r JOIN participants p ON p.id = r.participant_id{} "
        "WHERE r.study_id = %(study)s AND r.status = 'complete'"
    ).format(_SHIFT_JOIN if dates == "shifted" else sql.SQL(""))
    if until:
        source = sql.SQL("{} AND r.completed_at <= %(until)s").format(source)
    if one_site:
        source = sql.SQL("{} AND p.site_id = %(site)s").format(source)
    if only:
        source = sql.SQL("{} AND r.id = ANY(%(ids)s)").format(source)
    site = [sql.SQL("(SELECT s.key FROM sites s WHERE s.id = p.site_id) AS site")] if site_column else []
    if layout == "long":
        completed = _completed_at(typed, dates)
        late = [sql.SQL("r.late") if typed else sql.SQL("CASE WHEN r.late THEN 'true' ELSE 'false' END AS late")]
        keys = [sql.SQL("r.id AS response_id, {} AS row_version").format(sql.SQL(ROW_VERSION))] if keyed else []
        select = sql.SQL(", ").join([
            *keys, sql.SQL("{} AS participant").format(_pseudonym()), *site, sql.SQL("r.wave"),
            sql.SQL("{} AS completed_at").format(completed),
            *(late if with_late else []),
            *[sql.SQL("{} AS {}").format(_value(c, inert=inert, dates=dates), sql.Identifier(c.name))
              for c in cols],
        ])
        order = sql.SQL(" ORDER BY 1, {}").format(wave_order) if ordered else sql.SQL("")
        return sql.SQL("SELECT {} {}{}").format(select, source, order), cols
    # wide: one row per participant, one column per (item, wave) the codebook asks
    select = sql.SQL(", ").join([
        sql.SQL("{} AS participant").format(_pseudonym()), *site,
        *[sql.SQL("max({}) FILTER (WHERE r.wave = {}) AS {}").format(
            _value(c, inert=inert, dates=dates), sql.Literal(c.wave), sql.Identifier(c.name)) for c in cols],
    ])
    statement = sql.SQL("SELECT {} {} GROUP BY p.id, p.external_id, p.site_id ORDER BY 1").format(select, source)
    return statement, cols


def _completed_at(typed: bool, dates: str) -> sql.Composable:
    if dates == "year":
        return sql.SQL("extract(year FROM r.completed_at AT TIME ZONE 'UTC')::int::text")
    if dates != "shifted":
        return sql.SQL("r.completed_at" if typed else TEXT_TIME)
    shifted = "(r.completed_at + make_interval(days => sh.days))"
    return sql.SQL(shifted if typed else TEXT_TIME.replace("r.completed_at", shifted))


def versions_query(until: bool = False) -> sql.Composable:
    """Every complete response's id and version (`ROW_VERSION`), as `query` keys them: one text
    value of `id,version` lines under a `response_id,row_version` header (one message, not a row each)."""
    return sql.SQL("SELECT 'response_id,row_version' || chr(10) || coalesce(string_agg(r.id::text || ',' || "
                   "({})::text, chr(10)), '') FROM responses r "
                   "WHERE r.study_id = %(study)s AND r.status = 'complete'{}").format(
        sql.SQL(ROW_VERSION), sql.SQL(" AND r.completed_at <= %(until)s" if until else ""))


def params(study_id: Any, pseudonymiser: Pseudonymiser, until: datetime | None = None, *,
           site_id: uuid.UUID | None = None, shift_pads: tuple[bytes, bytes] | None = None,
           ids: list[uuid.UUID] | None = None) -> dict[str, Any]:
    inner, outer = pseudonymiser.sql_pads()
    shift_inner, shift_outer = shift_pads or (b"", b"")
    return {"study": study_id, "inner": inner, "outer": outer, "until": until, "site": site_id,
            "shift_inner": shift_inner, "shift_outer": shift_outer, "ids": ids}
