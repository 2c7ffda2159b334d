"""reminder sends carry their window's close and their participant's zone; withdrawal and
completion cancel pending sends in the database

Revision ID: 9b3e5d7f1a24
Revises: 4f6d2a9c8e17
Create Date: 2026-12-07 00:45:00.000000+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '9b3e5d7f1a24'
down_revision: str | None = '4f6d2a9c8e17'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The claim reads only reminder_sends (no probe of participants and schedules per send), so a
# pending send must never belong to a withdrawn participant or a completed window, and its
# copies of `closes_at` and `timezone` must be the schedule's and the participant's:
# - withdrawal (participants.withdrawn_at set) and completion (schedules.completed_at set) cancel
#   the pending sends at once, with the reasons the claim used to record; a changed zone or
#   close is copied to the sends;
# - a send that becomes pending (inserted, or back from `sending`: a lease released, a retry)
#   takes its copies from the rows and is cancelled instead if the participant has withdrawn or
#   the window is complete. It locks the participant, then the schedule, FOR SHARE, the order in
#   which every writer of a participant takes them (submit, withdrawal), so a withdrawal or
#   completion committed before is seen here, and one made after waits for this transaction
#   and then finds the send pending and cancels it. (The planner takes those participant locks
#   beforehand with SKIP LOCKED, as it does its schedules: it never waits on a writer.)
FUNCTIONS = r"""
CREATE FUNCTION cohort_reminders_follow_participant() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.withdrawn_at IS NOT NULL AND OLD.withdrawn_at IS NULL THEN
        UPDATE reminder_sends SET status = 'cancelled', last_error = 'participant withdrew', updated_at = now()
        WHERE participant_id = NEW.id AND status = 'pending';
    END IF;
    IF NEW.timezone IS DISTINCT FROM OLD.timezone THEN
        UPDATE reminder_sends SET timezone = NEW.timezone WHERE participant_id = NEW.id;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION cohort_reminders_follow_schedule() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.completed_at IS NOT NULL AND OLD.completed_at IS NULL THEN
        UPDATE reminder_sends SET status = 'cancelled', last_error = 'wave completed', updated_at = now()
        WHERE participant_id = NEW.participant_id AND wave = NEW.wave AND status = 'pending';
    END IF;
    IF NEW.closes_at IS DISTINCT FROM OLD.closes_at THEN
        UPDATE reminder_sends SET closes_at = NEW.closes_at WHERE participant_id = NEW.participant_id AND wave = NEW.wave;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION cohort_reminder_send_pending() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    withdrawn timestamptz;
    completed timestamptz;
BEGIN
    SELECT p.withdrawn_at, p.timezone INTO withdrawn, NEW.timezone
    FROM participants p WHERE p.id = NEW.participant_id FOR SHARE;
    SELECT s.completed_at, s.closes_at INTO completed, NEW.closes_at
    FROM schedules s WHERE s.participant_id = NEW.participant_id AND s.wave = NEW.wave FOR SHARE;
    IF NEW.status = 'pending' AND withdrawn IS NOT NULL THEN
        NEW.status := 'cancelled';
        NEW.last_error := 'participant withdrew';
    ELSIF NEW.status = 'pending' AND completed IS NOT NULL THEN
        NEW.status := 'cancelled';
        NEW.last_error := 'wave completed';
    END IF;
    RETURN NEW;
END $$;
"""

TRIGGERS = """
CREATE TRIGGER reminders_follow_participant AFTER UPDATE OF withdrawn_at, timezone ON participants FOR EACH ROW
    WHEN (NEW.withdrawn_at IS NOT NULL AND OLD.withdrawn_at IS NULL OR NEW.timezone IS DISTINCT FROM OLD.timezone)
    EXECUTE FUNCTION cohort_reminders_follow_participant();
CREATE TRIGGER reminders_follow_schedule AFTER UPDATE OF completed_at, closes_at ON schedules FOR EACH ROW
    WHEN (NEW.completed_at IS NOT NULL AND OLD.completed_at IS NULL OR NEW.closes_at IS DISTINCT FROM OLD.closes_at)
    EXECUTE FUNCTION cohort_reminders_follow_schedule();
CREATE TRIGGER reminder_send_inserted BEFORE INSERT ON reminder_sends FOR EACH ROW
    EXECUTE FUNCTION cohort_reminder_send_pending();
CREATE TRIGGER reminder_send_pending_again BEFORE UPDATE OF status ON reminder_sends FOR EACH ROW
    WHEN (NEW.status = 'pending' AND OLD.status <> 'pending')
    EXECUTE FUNCTION cohort_reminder_send_pending();
"""


def upgrade() -> None:
    op.add_column('reminder_sends', sa.Column('closes_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('reminder_sends', sa.Column('timezone', sa.String(length=64), nullable=True))
    # copying the window and zone is not a change to any send's history: not audited
    op.execute("SELECT set_config('cohort.audit_quiet', 'reminder_sends', true)")
    # a send whose window no longer exists was never claimed (the claim joined the schedule):
    # its window is taken to close when it fell due, so a claim skips it
    op.execute("""
        UPDATE reminder_sends r SET closes_at = s.closes_at, timezone = p.timezone
        FROM schedules s JOIN participants p ON p.id = s.participant_id
        WHERE s.participant_id = r.participant_id AND s.wave = r.wave""")
    op.execute("""
        UPDATE reminder_sends r SET closes_at = r.due_at, timezone = p.timezone FROM participants p
        WHERE p.id = r.participant_id AND r.closes_at IS NULL""")
    op.execute("SELECT set_config('cohort.audit_quiet', '', true)")
    # what the claim would have cancelled, cancelled now (audited), so the invariant holds from here
    op.execute("""
        UPDATE reminder_sends r SET status = 'cancelled', last_error = 'participant withdrew', updated_at = now()
        FROM participants p WHERE p.id = r.participant_id AND r.status = 'pending' AND p.withdrawn_at IS NOT NULL""")
    op.execute("""
        UPDATE reminder_sends r SET status = 'cancelled', last_error = 'wave completed', updated_at = now()
        FROM schedules s WHERE s.participant_id = r.participant_id AND s.wave = r.wave AND r.status = 'pending'
          AND s.completed_at IS NOT NULL""")
    op.alter_column('reminder_sends', 'closes_at', nullable=False)
    op.alter_column('reminder_sends', 'timezone', nullable=False)
    op.execute(FUNCTIONS)
    op.execute(TRIGGERS)


def downgrade() -> None:
    op.execute("""
        DROP TRIGGER reminder_send_pending_again ON reminder_sends;
        DROP TRIGGER reminder_send_inserted ON reminder_sends;
        DROP TRIGGER reminders_follow_schedule ON schedules;
        DROP TRIGGER reminders_follow_participant ON participants;
        DROP FUNCTION cohort_reminder_send_pending();
        DROP FUNCTION cohort_reminders_follow_schedule();
        DROP FUNCTION cohort_reminders_follow_participant();
    """)
    op.drop_column('reminder_sends', 'timezone')
    op.drop_column('reminder_sends', 'closes_at')
