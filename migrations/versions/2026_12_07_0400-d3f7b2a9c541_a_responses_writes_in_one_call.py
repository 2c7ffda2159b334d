"""a first complete response's writes in one call: the webhook event, the idempotency record, the
response, the schedule's completion and the participant's status

Revision ID: d3f7b2a9c541
Revises: c5e8a1f3b926
Create Date: 2026-12-07 04:00:00.000000+00:00

`POST /responses` sends its writes with the COMMIT in one pipelined round trip (`with_commit`):
four or five statements for a first complete response. Measured with py-spy on the bench, the client
side of that pipeline (each statement's send, sync and result) was the largest single cost of a
response in the API process, ~0.2 ms of CPU a statement; one call costs one statement's share.

The function runs the very statements the pipeline sent, each a statement of its own and in the
same order: the non-contended writes first (the webhook deliveries, the Idempotency-Key's record),
the contended ones last (the response, the schedule, the participant's status), so each statement's
triggers fire as before (the retention rollups count the response's INSERT and the schedule's
UPDATE separately) and the audit rows are the same (the actor is `cohort.actor`, set by the first
read). The optional writes are skipped when their parameters are NULL: no Idempotency-Key (a
record's id is never NULL), no status change (a status is never NULL). Any other set of writes is
still sent one statement each (`app.core.db.fold_with_commit`).
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = 'd3f7b2a9c541'
down_revision: str | None = 'c5e8a1f3b926'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ARGS = ("uuid, text, varchar[], uuid, jsonb, timestamptz, timestamptz, "
         "uuid, uuid, text, text, text, text, integer, bytea, uuid, timestamptz, "
         "uuid, uuid, uuid, text, text, jsonb, jsonb, text, integer, boolean, jsonb, timestamptz, timestamptz, "
         "timestamptz, uuid, uuid, text, timestamptz, uuid, text")


def upgrade() -> None:
    op.execute(CLOSE)


def downgrade() -> None:
    op.execute(f"DROP FUNCTION cohort_submit_close({_ARGS})")


# The writes, as the pipeline sent them (app.webhooks.repository.EMIT, app.idempotency.repository.STORE,
# app.responses.repository._INSERT, app.participants.repository.COMPLETE_WAVE and SET_STATUS).
CLOSE = """
CREATE FUNCTION cohort_submit_close(
    e_study uuid, e_event text, e_events varchar[], e_ordering uuid, e_payload jsonb, e_now timestamptz,
    e_give_up_at timestamptz,
    k_id uuid, k_token_id uuid, k_key text, k_method text, k_path text, k_fingerprint text,
    k_status_code integer, k_sealed_body bytea, k_resource_id uuid, k_created_at timestamptz,
    r_id uuid, r_study_id uuid, r_participant_id uuid, r_wave text, r_status text, r_answers jsonb,
    r_derived jsonb, r_derived_signature text, r_codebook_revision integer, r_late boolean,
    r_completed_instruments jsonb, r_completed_at timestamptz, r_received_at timestamptz,
    r_updated_at timestamptz, r_submitted_by uuid,
    s_p uuid, s_w text, s_c timestamptz,
    p_p uuid, p_s text)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (id, subscription_id, study_id, event, ordering_key, payload, status, attempts,
                                    next_attempt_at, give_up_at, created_at)
    SELECT gen_random_uuid(), ws.id, ws.study_id, e_event, e_ordering, e_payload, 'pending', 0, e_now,
           e_give_up_at, e_now
    FROM webhook_subscriptions ws
    WHERE ws.study_id = e_study AND ws.status = 'active' AND ws.events @> e_events;
    IF k_id IS NOT NULL THEN
        INSERT INTO idempotency_keys (id, token_id, key, method, path, fingerprint, status_code, sealed_body,
                                      resource_id, created_at)
        VALUES (k_id, k_token_id, k_key, k_method, k_path, k_fingerprint, k_status_code, k_sealed_body,
                k_resource_id, k_created_at);
    END IF;
    INSERT INTO responses (id, study_id, participant_id, wave, status, answers, derived, derived_signature,
                           codebook_revision, late, completed_instruments, completed_at, received_at, updated_at,
                           submitted_by)
    VALUES (r_id, r_study_id, r_participant_id, r_wave, r_status, r_answers, r_derived, r_derived_signature,
            r_codebook_revision, r_late, r_completed_instruments, r_completed_at, r_received_at, r_updated_at,
            r_submitted_by);
    UPDATE schedules SET status = 'completed', completed_at = s_c WHERE participant_id = s_p AND wave = s_w;
    IF p_s IS NOT NULL THEN
        UPDATE participants SET status = p_s WHERE id = p_p;
    END IF;
END $$;
"""
