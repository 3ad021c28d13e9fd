"""indexes for a reply's state read: when the person last wrote, the recent model calls

Revision ID: b3e9f2c41a57
Revises: 7c41e2a9d0f3
Create Date: 2026-12-01 21:05:00.000000

Both were read through the conversation's index, i.e. all of a conversation's messages or
calls for every reply; the read now runs on the event loop's thread (SQLite's inline
transactions), so its cost must not grow with the conversation.
"""

from collections.abc import Sequence

from alembic import op


revision: str = 'b3e9f2c41a57'
down_revision: str | None = '7c41e2a9d0f3'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        'ix_message_conversation_sender_time',
        'message',
        ['conversation_id', 'sender', 'created_at'],
    )
    op.create_index(
        'ix_assistant_call_conversation_time', 'assistant_call', ['conversation_id', 'created_at']
    )


def downgrade() -> None:
    op.drop_index('ix_assistant_call_conversation_time', table_name='assistant_call')
    op.drop_index('ix_message_conversation_sender_time', table_name='message')
