"""analysis plans as versioned, audited documents; analyses name their plan version and spec

Revision ID: 5c0a9e7d41b2
Revises: e120f520ba58
Create Date: 2026-11-30 23:30:00.000000+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '5c0a9e7d41b2'
down_revision: str | None = 'e120f520ba58'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# the study of an analysis_plans row is its study_id column (cohort_audit's 'column' mode)
AUDIT_ARGS = "'id', '', 'column'"


def upgrade() -> None:
    op.create_table(
        'analysis_plans',
        sa.Column('id', sa.UUID(), server_default=sa.text('gen_random_uuid()'), nullable=False),
        sa.Column('study_id', sa.UUID(), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('document', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('created_by', sa.UUID(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.CheckConstraint('version >= 1', name=op.f('ck_analysis_plans_version')),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_analysis_plans_study_id_studies'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_analysis_plans')),
        sa.UniqueConstraint('study_id', 'version', name=op.f('uq_analysis_plans_study_id_version')),
    )
    op.execute(f"""
        CREATE TRIGGER audit_insert AFTER INSERT ON analysis_plans REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION cohort_audit({AUDIT_ARGS});
        CREATE TRIGGER audit_update AFTER UPDATE ON analysis_plans
            REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION cohort_audit({AUDIT_ARGS});
        CREATE TRIGGER audit_delete AFTER DELETE ON analysis_plans REFERENCING OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION cohort_audit({AUDIT_ARGS});
    """)
    op.add_column('analyses', sa.Column('plan_version', sa.Integer(), nullable=True))
    op.add_column('analyses', sa.Column('spec', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    # models are a plan's keys now, not a fixed list
    op.drop_constraint(op.f('ck_analyses_model'), 'analyses', type_='check')


def downgrade() -> None:
    op.execute("DELETE FROM analyses WHERE model NOT IN ('table1', 'online_attendance', 'abstinence')")
    op.create_check_constraint(op.f('ck_analyses_model'), 'analyses',
                               "model IN ('table1', 'online_attendance', 'abstinence')")
    op.drop_column('analyses', 'spec')
    op.drop_column('analyses', 'plan_version')
    op.drop_table('analysis_plans')
