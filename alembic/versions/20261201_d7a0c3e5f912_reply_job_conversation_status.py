"""index reply_job (conversation_id, status): a conversation's queued jobs

Revision ID: d7a0c3e5f912
Revises: b3e9f2c41a57
Create Date: 2026-12-01 21:40:00.000000

The debounce and the claims look up a conversation's queued jobs; by the conversation's index
alone that is every job it ever had (done jobs are kept), by the status index every queued
job of every conversation. On PostgreSQL, CREATE INDEX blocks writes to reply_job while it
builds: seconds for millions of rows, once.
"""

from collections.abc import Sequence

from alembic import op


revision: str = 'd7a0c3e5f912'
down_revision: str | None = 'b3e9f2c41a57'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        'ix_reply_job_conversation_status', 'reply_job', ['conversation_id', 'status']
    )


def downgrade() -> None:
    op.drop_index('ix_reply_job_conversation_status', table_name='reply_job')
