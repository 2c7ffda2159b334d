"""retention by baseline primary group from a rollup too; rollup lookups stay index probes

Revision ID: 3e915ba3cde0
Revises: c3a8f0d5e612
Create Date: 2026-12-06 22:00:00.000000+00:00

`retention_group_counts` counts the schedules of participants who have a complete baseline
response, by the `primary_group` it gives, with the same key as `retention_counts`. Those
without one (no baseline yet, or no answer) are the overall count less every group's, so they
cost no row. A participant's group changes with their baseline response (completed, corrected,
deleted): a trigger on `responses` moves their schedules between groups.

The trigger functions are rewritten in the same step, for two things found while measuring:
their plans are cached per connection with the size of the first statement that ran them, so a
bulk import left every later one-row update hashing the whole participants table (400 ms a
statement at 1M participants) and JIT-compiling. Lookups by key are now lateral index probes,
whatever the size of the statement that planned them, and the functions run without JIT.

Each trigger reads the other tables as they are at the end of its statement, so a single
statement must not change a participant's schedules and their baseline response or withdrawal
together (a data-modifying CTE over two of these tables): separate statements, in any order,
keep the rollup exact.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op

revision: str = '3e915ba3cde0'
down_revision: str | None = 'c3a8f0d5e612'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'retention_group_counts',
        sa.Column('study_id', sa.UUID(), nullable=False),
        sa.Column('grp', sa.Text(), nullable=False),
        sa.Column('wave', sa.String(length=63), nullable=False),
        sa.Column('opens_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('closes_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('cls', sa.String(length=10), nullable=False),
        sa.Column('in_window', sa.Boolean(), nullable=False),
        sa.Column('late', sa.Boolean(), nullable=False),
        sa.Column('wd_ok', sa.Boolean(), nullable=False),
        sa.Column('shard', sa.SmallInteger(), nullable=False),
        sa.Column('n', sa.BigInteger(), nullable=False),
        sa.CheckConstraint("cls IN ('completed', 'withdrawn', 'pending')",
                           name=op.f('ck_retention_group_counts_cls')),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id'],
                                name=op.f('fk_retention_group_counts_study_id_studies'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('study_id', 'grp', 'wave', 'opens_at', 'closes_at', 'cls', 'in_window', 'late',
                                'wd_ok', 'shard', name=op.f('pk_retention_group_counts')),
    )
    op.execute(FUNCTIONS)
    op.execute(TRIGGERS)
    op.execute("SELECT cohort_retention_rebuild(id) FROM studies")


def downgrade() -> None:
    op.execute("""
        DROP TRIGGER retention_insert ON responses; DROP TRIGGER retention_update ON responses;
        DROP TRIGGER retention_delete ON responses;
        DROP TRIGGER retention_insert ON waves; DROP TRIGGER retention_update ON waves;
        DROP TRIGGER retention_delete ON waves;
        DROP FUNCTION cohort_retention_responses(); DROP FUNCTION cohort_retention_waves();
    """)
    op.execute(_previous().FUNCTIONS.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"))
    op.drop_table('retention_group_counts')


def _previous() -> ModuleType:
    """The rollup's functions as `retention_rollup` left them (a frozen file)."""
    path = next(Path(__file__).parent.glob("*-e77cbfe5c19d_*.py"))
    spec = importlib.util.spec_from_file_location("cohort_migration_e77cbfe5c19d", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KEY = "study_id, wave, opens_at, closes_at, cls, in_window, late, wd_ok"
DIMS = f"{KEY}, shard"
GROUP_DIMS = "study_id, grp, wave, opens_at, closes_at, cls, in_window, late, wd_ok, shard"
SHARDS = 16  # participants enrolled the same day share a key: spread them over rows, so that
# concurrent responses do not queue on one row lock
GROUP_SHARDS = 4  # the groups spread writers already; fewer rows keep the by-group read fast


def key(s: str, w: str) -> str:
    """The rollup key of schedule row `s` whose participant withdrew at `w`: all that retention
    compares except the clock (cls, in_window, late, wd_ok), and a hash of the participant."""
    in_window = f"({s}.completed_at >= {s}.opens_at AND {s}.completed_at < {s}.closes_at)"
    return (f"{s}.study_id, {s}.wave, {s}.opens_at, {s}.closes_at, "
            f"CASE WHEN {s}.completed_at IS NOT NULL THEN 'completed' "
            f"WHEN {w} IS NOT NULL AND {w} < {s}.closes_at THEN 'withdrawn' ELSE 'pending' END, "
            f"coalesce({in_window}, false), "
            f"{s}.completed_at IS NOT NULL AND NOT coalesce({in_window}, false), "
            f"({w} IS NULL OR {w} >= {s}.opens_at), "
            f"abs(hashtext({s}.participant_id::text))")


def baseline_wave(study: str) -> str:
    """The study's baseline: its first wave (the codebook's order, kept in `waves.position`)."""
    return f"(SELECT w.key FROM waves w WHERE w.study_id = {study} ORDER BY w.position, w.key LIMIT 1)"


def group_of(s: str) -> str:
    """A lateral probe for the primary group of schedule row `s`'s participant: their complete
    baseline response's answer (no row, or NULL: no group). OFFSET 0 keeps it an index probe."""
    return (f"LEFT JOIN LATERAL (SELECT r.answers ->> 'primary_group' AS grp FROM responses r "
            f"WHERE r.participant_id = {s}.participant_id AND r.wave = {baseline_wave(f'{s}.study_id')} "
            f"AND r.status = 'complete' OFFSET 0) g ON true")


def withdrawal_of(s: str) -> str:
    """A lateral probe for the participant of schedule row `s` (absent once deleted)."""
    return (f"LEFT JOIN LATERAL (SELECT p.withdrawn_at FROM participants p WHERE p.id = {s}.participant_id "
            f"OFFSET 0) p ON true")


def add(deltas: str, *, overall: bool = True, before: str = "") -> str:
    """Add signed counts to the rollups, in key order. `deltas` selects the key of `key()`, the
    participant's group (NULL: none) and the signed count; `before` are CTEs it reads."""
    by_group = f"""
        INSERT INTO retention_group_counts AS c ({GROUP_DIMS}, n)
        SELECT study_id, grp, wave, opens_at, closes_at, cls, in_window, late, wd_ok,
               (h % {GROUP_SHARDS})::smallint AS shard, sum(d) FROM x WHERE grp IS NOT NULL
        GROUP BY {GROUP_DIMS} HAVING sum(d) <> 0 ORDER BY {GROUP_DIMS}
        ON CONFLICT ({GROUP_DIMS}) DO UPDATE SET n = c.n + EXCLUDED.n"""
    if not overall:
        return f"WITH {before} x ({KEY}, h, grp, d) AS ({deltas}) {by_group};"
    return f"""
        WITH {before} x ({KEY}, h, grp, d) AS MATERIALIZED ({deltas}),
        everyone AS (
            INSERT INTO retention_counts AS c ({DIMS}, n)
            SELECT {KEY}, (h % {SHARDS})::smallint AS shard, sum(d) FROM x
            GROUP BY {DIMS} HAVING sum(d) <> 0 ORDER BY {DIMS}
            ON CONFLICT ({DIMS}) DO UPDATE SET n = c.n + EXCLUDED.n)
        {by_group};"""


def watermark(select: str) -> str:
    return f"""
        INSERT INTO retention_watermarks AS m (study_id, at) {select}
        ON CONFLICT (study_id) DO UPDATE SET at = greatest(m.at, EXCLUDED.at);"""


SCHEDULE_CHANGED = ("(o.study_id, o.wave, o.opens_at, o.closes_at, o.completed_at) IS DISTINCT FROM "
                    "(n.study_id, n.wave, n.opens_at, n.closes_at, n.completed_at)")


def members(rows: str | None) -> str:
    """(participant, group) of the complete baseline responses among `rows` (a transition table)."""
    if rows is None:
        return "SELECT NULL::uuid, NULL::text WHERE false"
    return (f"SELECT r.participant_id, r.answers ->> 'primary_group' FROM {rows} r "
            f"WHERE r.status = 'complete' AND r.wave = {baseline_wave('r.study_id')}")


def regroup(before: str | None, after: str | None) -> str:
    """Move the schedules of participants whose group changed between `before` and `after`."""
    ctes = f"""
        b (participant_id, grp) AS ({members(before)}),
        a (participant_id, grp) AS ({members(after)}),
        m AS (SELECT coalesce(a.participant_id, b.participant_id) AS participant_id,
                     b.grp AS old_grp, a.grp AS new_grp
              FROM b FULL JOIN a ON a.participant_id = b.participant_id
              WHERE b.grp IS DISTINCT FROM a.grp),"""
    return add(f"SELECT {key('s', 'p.withdrawn_at')}, t.grp, t.d FROM m "
               "CROSS JOIN LATERAL (VALUES (m.old_grp, -1), (m.new_grp, 1)) AS t(grp, d) "
               "CROSS JOIN LATERAL (SELECT * FROM schedules s WHERE s.participant_id = m.participant_id OFFSET 0) s "
               f"{withdrawal_of('s')} WHERE t.grp IS NOT NULL", overall=False, before=ctes)


def rebaseline(before: str | None, after: str | None) -> str:
    """Count again the studies whose first wave differs between the waves as they were (the
    current ones less `after`, plus `before`) and as they are."""
    changed = " UNION ".join(f"SELECT study_id FROM {t}" for t in (before, after) if t is not None)
    was = "SELECT study_id, key, position FROM now_w"
    if after is not None:
        was += f" EXCEPT ALL SELECT study_id, key, position FROM {after}"
    if before is not None:
        was = f"({was}) UNION ALL SELECT study_id, key, position FROM {before}"
    return f"""
        PERFORM cohort_retention_rebuild(study_id) FROM (
            WITH now_w AS (SELECT study_id, key, position FROM waves WHERE study_id IN ({changed})),
                 was_w AS ({was})
            SELECT coalesce(a.study_id, b.study_id) AS study_id FROM
                (SELECT DISTINCT ON (study_id) study_id, key FROM now_w ORDER BY study_id, position, key) a
                FULL JOIN (SELECT DISTINCT ON (study_id) study_id, key FROM was_w ORDER BY study_id, position, key) b
                ON a.study_id = b.study_id
            WHERE a.key IS DISTINCT FROM b.key AND coalesce(a.study_id, b.study_id) IN (SELECT id FROM studies)
        ) changed;"""


REBUILD = f"""
CREATE OR REPLACE FUNCTION cohort_retention_rebuild(study uuid) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM retention_counts WHERE study_id = study;
    DELETE FROM retention_group_counts WHERE study_id = study;
    {add(f"SELECT {key('s', 'p.withdrawn_at')}, g.grp, 1 FROM schedules s "
         "JOIN participants p ON p.id = s.participant_id "
         "LEFT JOIN (SELECT r.participant_id, r.answers ->> 'primary_group' AS grp FROM responses r "
         f"WHERE r.study_id = study AND r.status = 'complete' AND r.wave = {baseline_wave('study')}) g "
         "ON g.participant_id = s.participant_id WHERE s.study_id = study")}
    DELETE FROM retention_watermarks WHERE study_id = study;
    INSERT INTO retention_watermarks (study_id, at)
    SELECT study, greatest(max(greatest(p.enrolled_at, p.withdrawn_at)),
                           (SELECT max(completed_at) FROM schedules WHERE study_id = study))
    FROM participants p WHERE p.study_id = study HAVING count(*) > 0;
END $$;
"""

FUNCTIONS = REBUILD + f"""
CREATE OR REPLACE FUNCTION cohort_retention_schedules() RETURNS trigger LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        {watermark("SELECT study_id, max(completed_at) FROM new_rows WHERE completed_at IS NOT NULL "
                   "GROUP BY study_id")}
        {add(f"SELECT {key('s', 'p.withdrawn_at')}, g.grp, 1 FROM new_rows s {withdrawal_of('s')} {group_of('s')}")}
    ELSIF TG_OP = 'DELETE' THEN
        {add(f"SELECT {key('s', 'p.withdrawn_at')}, g.grp, -1 FROM old_rows s {withdrawal_of('s')} {group_of('s')}")}
    ELSE
        {watermark("SELECT study_id, max(completed_at) FROM new_rows WHERE completed_at IS NOT NULL "
                   "GROUP BY study_id")}
        {add(f"SELECT {key('o', 'p.withdrawn_at')}, g.grp, -1 FROM old_rows o JOIN new_rows n ON n.id = o.id "
             f"{withdrawal_of('o')} {group_of('o')} WHERE {SCHEDULE_CHANGED} "
             f"UNION ALL SELECT {key('n', 'p.withdrawn_at')}, g.grp, 1 FROM old_rows o JOIN new_rows n ON n.id = o.id "
             f"{withdrawal_of('n')} {group_of('n')} WHERE {SCHEDULE_CHANGED}")}
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION cohort_retention_participants() RETURNS trigger LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    {watermark("SELECT study_id, max(greatest(enrolled_at, withdrawn_at)) FROM new_rows GROUP BY study_id")}
    IF TG_OP = 'UPDATE' THEN
        {add(f"SELECT {key('s', 't.w')}, g.grp, t.d FROM old_rows o JOIN new_rows n ON n.id = o.id "
             "CROSS JOIN LATERAL (VALUES (o.withdrawn_at, -1), (n.withdrawn_at, 1)) AS t(w, d) "
             "CROSS JOIN LATERAL (SELECT * FROM schedules s WHERE s.participant_id = n.id OFFSET 0) s "
             f"{group_of('s')} WHERE o.withdrawn_at IS DISTINCT FROM n.withdrawn_at")}
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION cohort_retention_responses() RETURNS trigger LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        {regroup(None, 'new_rows')}
    ELSIF TG_OP = 'DELETE' THEN
        {regroup('old_rows', None)}
    ELSE
        {regroup('old_rows', 'new_rows')}
    END IF;
    RETURN NULL;
END $$;

-- The baseline is a study's first wave: when that changes, the study's groups are counted again.
CREATE FUNCTION cohort_retention_waves() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        {rebaseline(None, 'new_rows')}
    ELSIF TG_OP = 'DELETE' THEN
        {rebaseline('old_rows', None)}
    ELSE
        {rebaseline('old_rows', 'new_rows')}
    END IF;
    RETURN NULL;
END $$;
"""

TRIGGERS = """
CREATE TRIGGER retention_insert AFTER INSERT ON responses REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cohort_retention_responses();
CREATE TRIGGER retention_update AFTER UPDATE ON responses REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cohort_retention_responses();
CREATE TRIGGER retention_delete AFTER DELETE ON responses REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cohort_retention_responses();
CREATE TRIGGER retention_insert AFTER INSERT ON waves REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cohort_retention_waves();
CREATE TRIGGER retention_update AFTER UPDATE ON waves REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cohort_retention_waves();
CREATE TRIGGER retention_delete AFTER DELETE ON waves REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cohort_retention_waves();
"""
