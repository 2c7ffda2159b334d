"""the study's retention watermark in 16 shards, like the counts, instead of one row every writer locks

Revision ID: 4d2b8e6f1a37
Revises: 9b3e5d7f1a24
Create Date: 2026-12-07 00:50:00.000000+00:00

Every completion and every enrolment moved the study's one watermark row forward, so every writer
of a study queued for that row's lock until its commit: under 32 concurrent responses the row was
where they waited. The watermark is now kept per shard of the participant (the same shard as the
participant's `retention_counts` rows, so a writer locks no row that another writer of a different
shard needs); the study's watermark is the latest of its shards. A rebuild writes shard 0.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op

revision: str = '4d2b8e6f1a37'
down_revision: str | None = '9b3e5d7f1a24'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SHARDS = 16  # as retention_counts: abs(hashtext(participant_id::text)) % 16


def upgrade() -> None:
    op.add_column('retention_watermarks', sa.Column('shard', sa.SmallInteger(), server_default=sa.text('0'),
                                                    nullable=False))
    op.drop_constraint('pk_retention_watermarks', 'retention_watermarks', type_='primary')
    op.create_primary_key('pk_retention_watermarks', 'retention_watermarks', ['study_id', 'shard'])
    op.execute(functions(sharded_watermark))


def downgrade() -> None:
    op.execute(functions(_group_rollup().watermark))
    op.execute("""
        DELETE FROM retention_watermarks m USING retention_watermarks l
        WHERE m.study_id = l.study_id AND (m.at, m.shard) < (l.at, l.shard)""")
    op.drop_constraint('pk_retention_watermarks', 'retention_watermarks', type_='primary')
    op.drop_column('retention_watermarks', 'shard')
    op.create_primary_key('pk_retention_watermarks', 'retention_watermarks', ['study_id'])


def _group_rollup() -> ModuleType:
    """The rollup's SQL helpers as `retention_by_primary_group_rollup` left them (a frozen file)."""
    path = next(Path(__file__).parent.glob("*-3e915ba3cde0_*.py"))
    spec = importlib.util.spec_from_file_location("cohort_migration_3e915ba3cde0", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sharded_watermark(select: str) -> str:
    """`select` yields (study_id, participant id, instant) rows; each shard keeps its latest."""
    return f"""
        INSERT INTO retention_watermarks AS m (study_id, shard, at)
        SELECT study_id, (abs(hashtext(pid::text)) % {SHARDS})::smallint AS shard, max(at)
        FROM ({select}) w (study_id, pid, at) WHERE at IS NOT NULL
        GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (study_id, shard) DO UPDATE SET at = EXCLUDED.at WHERE m.at < EXCLUDED.at;"""


def functions(watermark: object) -> str:
    """The two trigger functions that move the watermark, with `watermark` writing it (the rest as
    `retention_by_primary_group_rollup` wrote them)."""
    g = _group_rollup()
    sharded = watermark is sharded_watermark
    if sharded:
        on_schedules = sharded_watermark("SELECT study_id, participant_id, completed_at FROM new_rows")
        on_participants = sharded_watermark("SELECT study_id, id, greatest(enrolled_at, withdrawn_at) FROM new_rows")
    else:
        on_schedules = g.watermark("SELECT study_id, max(completed_at) FROM new_rows WHERE completed_at IS NOT NULL "
                                   "GROUP BY study_id")
        on_participants = g.watermark("SELECT study_id, max(greatest(enrolled_at, withdrawn_at)) FROM new_rows "
                                      "GROUP BY study_id")
    key, add, withdrawal_of, group_of, changed = g.key, g.add, g.withdrawal_of, g.group_of, g.SCHEDULE_CHANGED
    return f"""
CREATE OR REPLACE FUNCTION cohort_retention_schedules() RETURNS trigger LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        {on_schedules}
        {add(f"SELECT {key('s', 'p.withdrawn_at')}, g.grp, 1 FROM new_rows s {withdrawal_of('s')} {group_of('s')}")}
    ELSIF TG_OP = 'DELETE' THEN
        {add(f"SELECT {key('s', 'p.withdrawn_at')}, g.grp, -1 FROM old_rows s {withdrawal_of('s')} {group_of('s')}")}
    ELSE
        {on_schedules}
        {add(f"SELECT {key('o', 'p.withdrawn_at')}, g.grp, -1 FROM old_rows o JOIN new_rows n ON n.id = o.id "
             f"{withdrawal_of('o')} {group_of('o')} WHERE {changed} "
             f"UNION ALL SELECT {key('n', 'p.withdrawn_at')}, g.grp, 1 FROM old_rows o JOIN new_rows n ON n.id = o.id "
             f"{withdrawal_of('n')} {group_of('n')} WHERE {changed}")}
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION cohort_retention_participants() RETURNS trigger LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    {on_participants}
    IF TG_OP = 'UPDATE' THEN
        {add(f"SELECT {key('s', 't.w')}, g.grp, t.d FROM old_rows o JOIN new_rows n ON n.id = o.id "
             "CROSS JOIN LATERAL (VALUES (o.withdrawn_at, -1), (n.withdrawn_at, 1)) AS t(w, d) "
             "CROSS JOIN LATERAL (SELECT * FROM schedules s WHERE s.participant_id = n.id OFFSET 0) s "
             f"{group_of('s')} WHERE o.withdrawn_at IS DISTINCT FROM n.withdrawn_at")}
    END IF;
    RETURN NULL;
END $$;
"""
