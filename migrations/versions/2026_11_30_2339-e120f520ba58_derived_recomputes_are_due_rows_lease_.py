"""derived recomputes are due rows; lease columns end in _at

Revision ID: e120f520ba58
Revises: 5c1f0a7d2b94
Create Date: 2026-11-30 23:39:36.380233+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'e120f520ba58'
down_revision: str | None = '5c1f0a7d2b94'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('derived_recomputes',
    sa.Column('study_id', sa.UUID(), nullable=False),
    sa.Column('requested_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_derived_recomputes_study_id_studies'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('study_id', name=op.f('pk_derived_recomputes'))
    )
    # a rename keeps the leases of sends in flight (and the partial index follows the column)
    op.alter_column('reminder_sends', 'lease_until', new_column_name='lease_expires_at')


def downgrade() -> None:
    op.alter_column('reminder_sends', 'lease_expires_at', new_column_name='lease_until')
    op.drop_table('derived_recomputes')
