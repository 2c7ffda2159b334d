"""a reminder's lease bookkeeping is not audited (the send's outcome still is)

Revision ID: 93e2d982bbbb
Revises: 02ceef58e563
Create Date: 2026-11-25 22:45:00.000000+00:00
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from alembic import op

revision: str = '93e2d982bbbb'
down_revision: str | None = '02ceef58e563'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _previous() -> ModuleType:
    """The function as the previous revision left it (a frozen file), to change one thing in it."""
    path = next(Path(__file__).parent.glob("*-02ceef58e563_*.py"))
    spec = importlib.util.spec_from_file_location("cohort_migration_02ceef58e563", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ANCHOR = "BEGIN\n    -- Statement triggers fire"
QUIET = """BEGIN
    -- Bookkeeping that a caller marks as quiet for this table (a reminder's lease being taken
    -- or renewed, thousands a minute) is not audited; the send's outcome is.
    IF current_setting('cohort.audit_quiet', true) = TG_TABLE_NAME THEN
        RETURN NULL;
    END IF;
    -- Statement triggers fire"""


def upgrade() -> None:
    before = _previous().WITH_EARLY_EXIT
    assert before.count(ANCHOR) == 1
    op.execute(before.replace(ANCHOR, QUIET))


def downgrade() -> None:
    op.execute(_previous().WITH_EARLY_EXIT)
