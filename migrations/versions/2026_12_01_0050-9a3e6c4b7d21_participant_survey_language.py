"""a participant's own language for the survey pages (the study's when not set)

Revision ID: 9a3e6c4b7d21
Revises: 980275282f55
Create Date: 2026-11-30 23:45:00.000000+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '9a3e6c4b7d21'
down_revision: str | None = '980275282f55'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('participants', sa.Column('language', sa.String(length=8), nullable=True))


def downgrade() -> None:
    op.drop_column('participants', 'language')
