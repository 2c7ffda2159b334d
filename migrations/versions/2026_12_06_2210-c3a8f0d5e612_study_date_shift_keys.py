"""a per-study random key (sealed) that de-identified exports derive each participant's date shift from

Revision ID: c3a8f0d5e612
Revises: b7d2e4f1a9c3
Create Date: 2026-12-06 22:10:00.000000+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'c3a8f0d5e612'
down_revision: str | None = 'b7d2e4f1a9c3'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('studies', sa.Column('date_shift_key', sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_column('studies', 'date_shift_key')
