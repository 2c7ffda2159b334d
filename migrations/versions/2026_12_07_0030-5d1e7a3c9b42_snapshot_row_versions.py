"""analysis snapshots keep their basis and each row's version (incremental reads after new data)

Revision ID: 5d1e7a3c9b42
Revises: b7e2c91d4a60
Create Date: 2026-12-07 00:30:00.000000+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '5d1e7a3c9b42'
down_revision: str | None = 'b7e2c91d4a60'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('analysis_snapshots', sa.Column('basis', sa.String(length=64), nullable=True))
    op.add_column('analysis_snapshots', sa.Column('row_keys', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_column('analysis_snapshots', 'row_keys')
    op.drop_column('analysis_snapshots', 'basis')
