"""instruments complete one at a time: responses.completed_instruments

Revision ID: 5c1f0a7d2b94
Revises: e2aa1303946b
Create Date: 2026-11-30 23:30:00.000000+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '5c1f0a7d2b94'
down_revision: str | None = 'e2aa1303946b'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing complete responses need no backfill: a complete response has every instrument complete.
    op.add_column('responses', sa.Column('completed_instruments', postgresql.JSONB(astext_type=sa.Text()),
                                         server_default=sa.text("'{}'::jsonb"), nullable=False))


def downgrade() -> None:
    op.drop_column('responses', 'completed_instruments')
