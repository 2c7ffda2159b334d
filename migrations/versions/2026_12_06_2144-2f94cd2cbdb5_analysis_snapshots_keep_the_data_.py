"""Analysis snapshots keep the data fingerprint they were read at, so a fit on unchanged data reuses one.

Revision ID: 2f94cd2cbdb5
Revises: 9a3e6c4b7d21
Create Date: 2026-12-06 21:44:23.354649+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '2f94cd2cbdb5'
down_revision: str | None = '9a3e6c4b7d21'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('analysis_snapshots', sa.Column('data_key', sa.String(length=64), nullable=True))
    op.create_index('ix_analysis_snapshots_study_data_key', 'analysis_snapshots', ['study_id', 'data_key'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_analysis_snapshots_study_data_key', table_name='analysis_snapshots')
    op.drop_column('analysis_snapshots', 'data_key')
