"""a response's first reads in one call: the study, the token's confirmation, the idempotency claim,
the participant's lock and their stored responses

Revision ID: c5e8a1f3b926
Revises: 8f3c5a9e2d14
Create Date: 2026-12-07 03:30:00.000000+00:00

`POST /responses` started with four reads sent in one pipelined round trip. Measured on the bench,
the client side of a pipeline of reads (each statement's send, sync and result) was the largest
single cost of a response in the API process; one statement returning one row costs a fraction.

Each read stays a query of its own inside the function, in the order they were sent: in READ
COMMITTED each query of a VOLATILE function takes a new snapshot, so the stored responses are read
after the participant's lock is granted (and see what its previous holder committed), as before.
The study and participant come back as their table's row types, so a column added to either
table later needs no change here; the caller names the columns it reads.
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = 'c5e8a1f3b926'
down_revision: str | None = '8f3c5a9e2d14'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(OPEN)


def downgrade() -> None:
    op.execute("DROP FUNCTION cohort_submit_open(text, text, uuid, bigint, uuid, text)")


# The four reads, as the hot path sent them (app.studies.repository.with_revision_read with the
# token confirmation of app.tokens.repository.LIVE_ACTOR, app.idempotency.repository.claim_read,
# app.participants.repository.by_external_id_locked_read, app.responses.repository.stored_read).
# No idempotency key: no claim (all claim columns NULL). No study: no confirmation either.
OPEN = """
CREATE FUNCTION cohort_submit_open(p_study_key text, p_external_id text, p_confirm_token uuid,
                                   p_lock_id bigint, p_token uuid, p_idempotency_key text)
RETURNS TABLE (o_study studies, o_codebook_id uuid, o_revision integer, o_confirmed text,
               o_locked boolean, o_record_id uuid, o_fingerprint varchar, o_status_code integer,
               o_sealed_body bytea, o_created_at timestamptz, o_participant participants, o_stored jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT s.* INTO o_study FROM studies s WHERE s.key = p_study_key;
    IF FOUND THEN
        SELECT c.id, c.revision INTO o_codebook_id, o_revision
        FROM codebooks c WHERE c.study_id = (o_study).id ORDER BY c.revision DESC LIMIT 1;
        o_confirmed := (SELECT set_config('cohort.actor', t.id::varchar, true) FROM api_tokens t
                        WHERE t.id = p_confirm_token AND t.revoked_at IS NULL);
    END IF;
    IF p_idempotency_key IS NOT NULL THEN
        SELECT k.locked, k.record_id, k.fingerprint, k.status_code, k.sealed_body, k.created_at
        INTO o_locked, o_record_id, o_fingerprint, o_status_code, o_sealed_body, o_created_at
        FROM cohort_idempotency_claim(p_lock_id, p_token, p_idempotency_key) k;
    END IF;
    SELECT p.* INTO o_participant FROM participants p
    WHERE p.study_id = (o_study).id AND p.external_id = p_external_id
    FOR NO KEY UPDATE;
    o_stored := (SELECT coalesce(jsonb_agg(jsonb_build_array(r.wave, r.status, r.derived)), '[]'::jsonb)
                 FROM responses r WHERE r.participant_id = (o_participant).id);
    RETURN NEXT;
END $$;
"""
