"""idempotency: take a key's lock and read its stored reply in one round trip

Revision ID: b7e2c91d4a60
Revises: 3e915ba3cde0
Create Date: 2026-12-06 22:40:00.000000+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = 'b7e2c91d4a60'
down_revision: str | None = '3e915ba3cde0'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(CLAIM)


def downgrade() -> None:
    op.execute("DROP FUNCTION cohort_idempotency_claim(bigint, uuid, text)")


# The read must be a query of its own, after the lock: in READ COMMITTED each query of a VOLATILE
# function takes a new snapshot, so a request that held the key and has just committed is seen
# (and replayed) rather than run twice. One SELECT of one statement would take its snapshot before
# the lock. Not locked: (false, nulls). Locked without a stored reply: (true, nulls).
CLAIM = r"""
CREATE FUNCTION cohort_idempotency_claim(lock_id bigint, token uuid, idempotency_key text)
RETURNS TABLE (locked boolean, record_id uuid, fingerprint varchar, status_code integer, sealed_body bytea,
               created_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    IF NOT pg_try_advisory_xact_lock(lock_id) THEN
        RETURN QUERY SELECT false, NULL::uuid, NULL::varchar, NULL::integer, NULL::bytea, NULL::timestamptz;
        RETURN;
    END IF;
    RETURN QUERY SELECT true, k.id, k.fingerprint, k.status_code, k.sealed_body, k.created_at
                 FROM idempotency_keys k WHERE k.token_id = token AND k.key = idempotency_key;
    IF NOT FOUND THEN
        RETURN QUERY SELECT true, NULL::uuid, NULL::varchar, NULL::integer, NULL::bytea, NULL::timestamptz;
    END IF;
END $$;
"""
