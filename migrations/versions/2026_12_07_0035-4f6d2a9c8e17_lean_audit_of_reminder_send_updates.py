"""the audit of reminder_sends updates compares columns instead of JSON documents

Revision ID: 4f6d2a9c8e17
Revises: 5d1e7a3c9b42
Create Date: 2026-12-07 00:35:00.000000+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '4f6d2a9c8e17'
down_revision: str | None = '5d1e7a3c9b42'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The same entries as cohort_audit writes for an UPDATE (actor, txid, row id, study, `changed`
# in key order, before and after as JSON, rows that did not change left out), for a table whose
# key is `id`, whose study is its `study_id` and that has no redacted column. cohort_audit runs
# two SQL functions per row (`cohort_changed` expands both documents with jsonb_each,
# `cohort_redact` an empty list), most of the cost of recording a claim's 1,000 decisions; here
# `changed` is one IS DISTINCT FROM per column of the rows themselves. The column list is read
# from the catalogue on each call, so a column added later is compared too.
LEAN_UPDATE = r"""
CREATE FUNCTION cohort_audit_update_lean() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed_columns text;
BEGIN
    -- quiet bookkeeping (a lease), or a statement that changed no row (a cancellation with
    -- nothing left to cancel): nothing to record
    IF current_setting('cohort.audit_quiet', true) = TG_TABLE_NAME OR NOT EXISTS (SELECT FROM new_rows) THEN
        RETURN NULL;
    END IF;
    SELECT string_agg(format('CASE WHEN o.%1$I IS DISTINCT FROM n.%1$I THEN %1$L END', a.attname),
                      ', ' ORDER BY a.attname::text COLLATE "default")
      INTO changed_columns
      FROM pg_attribute a WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped;
    EXECUTE format($q$
        INSERT INTO audit_log (actor, txid, table_name, row_id, action, study_id, changed, before, after)
        SELECT $1, txid_current(), %L, c.id::text, 'UPDATE', c.study_id, to_jsonb(c.changed),
               to_jsonb(c.o), to_jsonb(c.n)
        FROM (SELECT n.id, n.study_id, o, n, array_remove(ARRAY[%s]::text[], NULL) AS changed
              FROM old_rows o JOIN new_rows n ON o.id = n.id) c
        WHERE cardinality(c.changed) > 0 $q$, TG_TABLE_NAME, changed_columns)
    USING nullif(current_setting('cohort.actor', true), '');
    RETURN NULL;
END $$;
"""


def upgrade() -> None:
    op.execute(LEAN_UPDATE)
    op.execute("""
        DROP TRIGGER audit_update ON reminder_sends;
        CREATE TRIGGER audit_update AFTER UPDATE ON reminder_sends REFERENCING OLD TABLE AS old_rows
            NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cohort_audit_update_lean();
    """)


def downgrade() -> None:
    op.execute("""
        DROP TRIGGER audit_update ON reminder_sends;
        CREATE TRIGGER audit_update AFTER UPDATE ON reminder_sends REFERENCING OLD TABLE AS old_rows
            NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION cohort_audit('id', '', 'column');
        DROP FUNCTION cohort_audit_update_lean();
    """)
