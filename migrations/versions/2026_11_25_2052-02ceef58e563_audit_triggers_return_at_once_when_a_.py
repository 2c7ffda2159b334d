"""audit triggers return at once when a statement changed no rows

Revision ID: 02ceef58e563
Revises: 3e1380682884
Create Date: 2026-11-25 20:52:03.684164+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '02ceef58e563'
down_revision: str | None = '3e1380682884'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(WITH_EARLY_EXIT)


def downgrade() -> None:
    op.execute(WITHOUT_EARLY_EXIT)


WITHOUT_EARLY_EXIT = r"""
CREATE OR REPLACE FUNCTION cohort_audit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    pk text := TG_ARGV[0];
    redacted text[] := CASE WHEN TG_ARGV[1] = '' THEN '{}'::text[] ELSE string_to_array(TG_ARGV[1], ',') END;
    actor text := nullif(current_setting('cohort.actor', true), '');
    hide_deleted boolean := coalesce(current_setting('cohort.redact_deleted', true), '') = 'on';
    study_of text := CASE TG_ARGV[2]
        WHEN 'self' THEN $s$(r.j ->> 'id')::uuid$s$
        WHEN 'column' THEN $s$(r.j ->> 'study_id')::uuid$s$
        WHEN 'participant' THEN $s$(SELECT p.study_id FROM participants p
                                    WHERE p.id = (r.j ->> 'participant_id')::uuid)$s$
        WHEN 'response' THEN $s$(SELECT x.study_id FROM responses x WHERE x.id = (r.j ->> 'response_id')::uuid)$s$
    END;
BEGIN
    IF TG_OP = 'INSERT' THEN
        EXECUTE format($q$
            INSERT INTO audit_log (actor, txid, table_name, row_id, action, study_id, after)
            SELECT $1, txid_current(), %L, r.j ->> %L, 'INSERT', %s, cohort_redact(r.j, $2)
            FROM (SELECT to_jsonb(n) AS j FROM new_rows n) r $q$, TG_TABLE_NAME, pk, study_of)
        USING actor, redacted;
    ELSIF TG_OP = 'UPDATE' THEN
        EXECUTE format($q$
            INSERT INTO audit_log (actor, txid, table_name, row_id, action, study_id, changed, before, after)
            SELECT $1, txid_current(), %L, r.j ->> %L, 'UPDATE', %s, cohort_changed(r.o, r.j),
                   cohort_redact(r.o, $2), cohort_redact(r.j, $2)
            FROM (SELECT to_jsonb(o) AS o, to_jsonb(n) AS j FROM old_rows o JOIN new_rows n ON o.%I = n.%I) r
            WHERE r.o IS DISTINCT FROM r.j $q$, TG_TABLE_NAME, pk, study_of, pk, pk)
        USING actor, redacted;
    ELSE
        EXECUTE format($q$
            INSERT INTO audit_log (actor, txid, table_name, row_id, action, study_id, before)
            SELECT $1, txid_current(), %L, r.j ->> %L, 'DELETE', %s,
                   CASE WHEN $3 THEN jsonb_build_object(%L, r.j -> %L,
                                                        'redacted', 'deleted under the withdrawal policy')
                        ELSE cohort_redact(r.j, $2) END
            FROM (SELECT to_jsonb(o) AS j FROM old_rows o) r $q$, TG_TABLE_NAME, pk, study_of, pk, pk)
        USING actor, redacted, hide_deleted;
    END IF;
    RETURN NULL;
END $$;

"""

WITH_EARLY_EXIT = r"""
CREATE OR REPLACE FUNCTION cohort_audit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    pk text := TG_ARGV[0];
    redacted text[] := CASE WHEN TG_ARGV[1] = '' THEN '{}'::text[] ELSE string_to_array(TG_ARGV[1], ',') END;
    actor text := nullif(current_setting('cohort.actor', true), '');
    hide_deleted boolean := coalesce(current_setting('cohort.redact_deleted', true), '') = 'on';
    study_of text := CASE TG_ARGV[2]
        WHEN 'self' THEN $s$(r.j ->> 'id')::uuid$s$
        WHEN 'column' THEN $s$(r.j ->> 'study_id')::uuid$s$
        WHEN 'participant' THEN $s$(SELECT p.study_id FROM participants p
                                    WHERE p.id = (r.j ->> 'participant_id')::uuid)$s$
        WHEN 'response' THEN $s$(SELECT x.study_id FROM responses x WHERE x.id = (r.j ->> 'response_id')::uuid)$s$
    END;
    changed boolean;
BEGIN
    -- Statement triggers fire even when nothing changed (an UPDATE matching no row): leave at once.
    EXECUTE CASE WHEN TG_OP = 'DELETE' THEN 'SELECT EXISTS (SELECT 1 FROM old_rows)'
                 ELSE 'SELECT EXISTS (SELECT 1 FROM new_rows)' END INTO changed;
    IF NOT changed THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        EXECUTE format($q$
            INSERT INTO audit_log (actor, txid, table_name, row_id, action, study_id, after)
            SELECT $1, txid_current(), %L, r.j ->> %L, 'INSERT', %s, cohort_redact(r.j, $2)
            FROM (SELECT to_jsonb(n) AS j FROM new_rows n) r $q$, TG_TABLE_NAME, pk, study_of)
        USING actor, redacted;
    ELSIF TG_OP = 'UPDATE' THEN
        EXECUTE format($q$
            INSERT INTO audit_log (actor, txid, table_name, row_id, action, study_id, changed, before, after)
            SELECT $1, txid_current(), %L, r.j ->> %L, 'UPDATE', %s, cohort_changed(r.o, r.j),
                   cohort_redact(r.o, $2), cohort_redact(r.j, $2)
            FROM (SELECT to_jsonb(o) AS o, to_jsonb(n) AS j FROM old_rows o JOIN new_rows n ON o.%I = n.%I) r
            WHERE r.o IS DISTINCT FROM r.j $q$, TG_TABLE_NAME, pk, study_of, pk, pk)
        USING actor, redacted;
    ELSE
        EXECUTE format($q$
            INSERT INTO audit_log (actor, txid, table_name, row_id, action, study_id, before)
            SELECT $1, txid_current(), %L, r.j ->> %L, 'DELETE', %s,
                   CASE WHEN $3 THEN jsonb_build_object(%L, r.j -> %L,
                                                        'redacted', 'deleted under the withdrawal policy')
                        ELSE cohort_redact(r.j, $2) END
            FROM (SELECT to_jsonb(o) AS j FROM old_rows o) r $q$, TG_TABLE_NAME, pk, study_of, pk, pk)
        USING actor, redacted, hide_deleted;
    END IF;
    RETURN NULL;
END $$;

"""
