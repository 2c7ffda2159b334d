"""sites: partitions of a study, the participant's site, site-scoped tokens and site moves

Revision ID: b7d2e4f1a9c3
Revises: 2f94cd2cbdb5
Create Date: 2026-12-06 22:00:00.000000+00:00
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'b7d2e4f1a9c3'
down_revision: str | None = '2f94cd2cbdb5'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# both new tables find their study in their study_id column (cohort_audit's 'column' mode)
AUDITED = ("sites", "participant_site_moves")


def upgrade() -> None:
    op.create_table(
        'sites',
        sa.Column('id', sa.UUID(), server_default=sa.text('gen_random_uuid()'), nullable=False),
        sa.Column('study_id', sa.UUID(), nullable=False),
        sa.Column('key', sa.String(length=63), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('timezone', sa.String(length=64), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.CheckConstraint("key ~ '^[a-z0-9][a-z0-9-]{0,62}$'", name=op.f('ck_sites_key_format')),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_sites_study_id_studies'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_sites')),
        sa.UniqueConstraint('study_id', 'key', name=op.f('uq_sites_study_id_key')),
    )
    op.add_column('participants', sa.Column('site_id', sa.UUID(), nullable=True))
    op.create_index('ix_participants_site', 'participants', ['site_id'], unique=False)
    op.create_foreign_key(op.f('fk_participants_site_id_sites'), 'participants', 'sites', ['site_id'], ['id'],
                          ondelete='RESTRICT')
    op.add_column('api_tokens', sa.Column('site_id', sa.UUID(), nullable=True))
    op.create_foreign_key(op.f('fk_api_tokens_site_id_sites'), 'api_tokens', 'sites', ['site_id'], ['id'],
                          ondelete='CASCADE')
    op.create_check_constraint(op.f('ck_api_tokens_site_in_study'), 'api_tokens',
                               'site_id IS NULL OR study_id IS NOT NULL')
    op.create_table(
        'participant_site_moves',
        sa.Column('id', sa.UUID(), server_default=sa.text('gen_random_uuid()'), nullable=False),
        sa.Column('study_id', sa.UUID(), nullable=False),
        sa.Column('participant_id', sa.UUID(), nullable=False),
        sa.Column('from_site_id', sa.UUID(), nullable=True),
        sa.Column('to_site_id', sa.UUID(), nullable=True),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('moved_by', sa.UUID(), nullable=True),
        sa.Column('moved_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.ForeignKeyConstraint(['study_id'], ['studies.id'],
                                name=op.f('fk_participant_site_moves_study_id_studies'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['participant_id'], ['participants.id'],
                                name=op.f('fk_participant_site_moves_participant_id_participants'),
                                ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['from_site_id'], ['sites.id'],
                                name=op.f('fk_participant_site_moves_from_site_id_sites'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['to_site_id'], ['sites.id'],
                                name=op.f('fk_participant_site_moves_to_site_id_sites'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_participant_site_moves')),
    )
    op.create_index(op.f('ix_participant_site_moves_participant_id'), 'participant_site_moves', ['participant_id'],
                    unique=False)
    for table in AUDITED:
        op.execute(f"""
            CREATE TRIGGER audit_insert AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows
                FOR EACH STATEMENT EXECUTE FUNCTION cohort_audit('id', '', 'column');
            CREATE TRIGGER audit_update AFTER UPDATE ON {table} REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
                FOR EACH STATEMENT EXECUTE FUNCTION cohort_audit('id', '', 'column');
            CREATE TRIGGER audit_delete AFTER DELETE ON {table} REFERENCING OLD TABLE AS old_rows
                FOR EACH STATEMENT EXECUTE FUNCTION cohort_audit('id', '', 'column');
        """)


def downgrade() -> None:
    op.drop_index(op.f('ix_participant_site_moves_participant_id'), table_name='participant_site_moves')
    op.drop_table('participant_site_moves')
    op.drop_constraint(op.f('ck_api_tokens_site_in_study'), 'api_tokens', type_='check')
    op.drop_constraint(op.f('fk_api_tokens_site_id_sites'), 'api_tokens', type_='foreignkey')
    op.drop_column('api_tokens', 'site_id')
    op.drop_constraint(op.f('fk_participants_site_id_sites'), 'participants', type_='foreignkey')
    op.drop_index('ix_participants_site', table_name='participants')
    op.drop_column('participants', 'site_id')
    op.drop_table('sites')
