"""retention rollup kept by triggers on schedules and participants

Revision ID: e77cbfe5c19d
Revises: 93e2d982bbbb
Create Date: 2026-11-25 23:35:00.000000+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'e77cbfe5c19d'
down_revision: str | None = '93e2d982bbbb'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'retention_counts',
        sa.Column('study_id', sa.UUID(), nullable=False),
        sa.Column('wave', sa.String(length=63), nullable=False),
        sa.Column('opens_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('closes_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('cls', sa.String(length=10), nullable=False),
        sa.Column('in_window', sa.Boolean(), nullable=False),
        sa.Column('late', sa.Boolean(), nullable=False),
        sa.Column('wd_ok', sa.Boolean(), nullable=False),
        sa.Column('shard', sa.SmallInteger(), nullable=False),
        sa.Column('n', sa.BigInteger(), nullable=False),
        sa.CheckConstraint("cls IN ('completed', 'withdrawn', 'pending')", name=op.f('ck_retention_counts_cls')),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_retention_counts_study_id_studies'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('study_id', 'wave', 'opens_at', 'closes_at', 'cls', 'in_window', 'late', 'wd_ok',
                                'shard', name=op.f('pk_retention_counts')),
    )
    op.create_table(
        'retention_watermarks',
        sa.Column('study_id', sa.UUID(), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_retention_watermarks_study_id_studies'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('study_id', name=op.f('pk_retention_watermarks')),
    )
    op.execute(FUNCTIONS)
    op.execute(TRIGGERS)
    op.execute("SELECT cohort_retention_rebuild(id) FROM studies")


def downgrade() -> None:
    op.execute("""
        DROP TRIGGER retention_insert ON schedules; DROP TRIGGER retention_update ON schedules;
        DROP TRIGGER retention_delete ON schedules; DROP TRIGGER retention_insert ON participants;
        DROP TRIGGER retention_update ON participants;
        DROP FUNCTION cohort_retention_schedules(); DROP FUNCTION cohort_retention_participants();
        DROP FUNCTION cohort_retention_rebuild(uuid);
    """)
    op.drop_table('retention_watermarks')
    op.drop_table('retention_counts')


DIMS = "study_id, wave, opens_at, closes_at, cls, in_window, late, wd_ok, shard"
SHARDS = 16  # participants enrolled the same day share a key: spread them over rows, so that
# concurrent responses do not queue on one row lock


def key(s: str, w: str) -> str:
    """The rollup key of schedule row `s` whose participant withdrew at `w`: all that retention
    compares except the clock (cls, in_window, late, wd_ok), and a shard of the participant."""
    in_window = f"({s}.completed_at >= {s}.opens_at AND {s}.completed_at < {s}.closes_at)"
    return (f"{s}.study_id, {s}.wave, {s}.opens_at, {s}.closes_at, "
            f"CASE WHEN {s}.completed_at IS NOT NULL THEN 'completed' "
            f"WHEN {w} IS NOT NULL AND {w} < {s}.closes_at THEN 'withdrawn' ELSE 'pending' END, "
            f"coalesce({in_window}, false), "
            f"{s}.completed_at IS NOT NULL AND NOT coalesce({in_window}, false), "
            f"({w} IS NULL OR {w} >= {s}.opens_at), "
            f"(abs(hashtext({s}.participant_id::text)) % {SHARDS})::smallint")


def add(select: str) -> str:
    """Add signed counts (the select's last column) to the rollup, in key order."""
    return f"""
        INSERT INTO retention_counts AS c ({DIMS}, n)
        SELECT {DIMS}, sum(d) FROM ({select}) AS x({DIMS}, d)
        GROUP BY {DIMS} HAVING sum(d) <> 0 ORDER BY {DIMS}
        ON CONFLICT ({DIMS}) DO UPDATE SET n = c.n + EXCLUDED.n;"""


def watermark(select: str) -> str:
    return f"""
        INSERT INTO retention_watermarks AS m (study_id, at) {select}
        ON CONFLICT (study_id) DO UPDATE SET at = greatest(m.at, EXCLUDED.at);"""


SCHEDULE_CHANGED = ("(o.study_id, o.wave, o.opens_at, o.closes_at, o.completed_at) IS DISTINCT FROM "
                    "(n.study_id, n.wave, n.opens_at, n.closes_at, n.completed_at)")

FUNCTIONS = f"""
CREATE FUNCTION cohort_retention_rebuild(study uuid) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM retention_counts WHERE study_id = study;
    {add(f"SELECT {key('s', 'p.withdrawn_at')}, 1 FROM schedules s "
         "JOIN participants p ON p.id = s.participant_id WHERE s.study_id = study")}
    DELETE FROM retention_watermarks WHERE study_id = study;
    INSERT INTO retention_watermarks (study_id, at)
    SELECT study, greatest(max(greatest(p.enrolled_at, p.withdrawn_at)),
                           (SELECT max(completed_at) FROM schedules WHERE study_id = study))
    FROM participants p WHERE p.study_id = study HAVING count(*) > 0;
END $$;

CREATE FUNCTION cohort_retention_schedules() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        {watermark("SELECT study_id, max(completed_at) FROM new_rows WHERE completed_at IS NOT NULL "
                   "GROUP BY study_id")}
        {add(f"SELECT {key('s', 'p.withdrawn_at')}, 1 FROM new_rows s JOIN participants p ON p.id = s.participant_id")}
    ELSIF TG_OP = 'DELETE' THEN
        {add(f"SELECT {key('s', 'p.withdrawn_at')}, -1 FROM old_rows s "
             "LEFT JOIN participants p ON p.id = s.participant_id")}
    ELSE
        {watermark("SELECT study_id, max(completed_at) FROM new_rows WHERE completed_at IS NOT NULL "
                   "GROUP BY study_id")}
        {add(f"SELECT {key('o', 'p.withdrawn_at')}, -1 FROM old_rows o JOIN new_rows n ON n.id = o.id "
             f"JOIN participants p ON p.id = o.participant_id WHERE {SCHEDULE_CHANGED} "
             f"UNION ALL SELECT {key('n', 'p.withdrawn_at')}, 1 FROM old_rows o JOIN new_rows n ON n.id = o.id "
             f"JOIN participants p ON p.id = n.participant_id WHERE {SCHEDULE_CHANGED}")}
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION cohort_retention_participants() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    {watermark("SELECT study_id, max(greatest(enrolled_at, withdrawn_at)) FROM new_rows GROUP BY study_id")}
    IF TG_OP = 'UPDATE' THEN
        {add(f"SELECT {key('s', 'o.withdrawn_at')}, -1 FROM old_rows o JOIN new_rows n ON n.id = o.id "
             "JOIN schedules s ON s.participant_id = n.id WHERE o.withdrawn_at IS DISTINCT FROM n.withdrawn_at "
             f"UNION ALL SELECT {key('s', 'n.withdrawn_at')}, 1 FROM old_rows o JOIN new_rows n ON n.id = o.id "
             "JOIN schedules s ON s.participant_id = n.id WHERE o.withdrawn_at IS DISTINCT FROM n.withdrawn_at")}
    END IF;
    RETURN NULL;
END $$;
"""

TRIGGERS = """
CREATE TRIGGER retention_insert AFTER INSERT ON schedules REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cohort_retention_schedules();
CREATE TRIGGER retention_update AFTER UPDATE ON schedules REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cohort_retention_schedules();
CREATE TRIGGER retention_delete AFTER DELETE ON schedules REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cohort_retention_schedules();
CREATE TRIGGER retention_insert AFTER INSERT ON participants REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cohort_retention_participants();
CREATE TRIGGER retention_update AFTER UPDATE ON participants REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION cohort_retention_participants();
"""
