"""message media (MMS attachments: URL, type, size, state)

Revision ID: 7c41e2a9d0f3
Revises: 7c1e5a9d2f40
Create Date: 2026-12-01 13:50:00.000000

Twilio messages stored before this revision kept their media URLs (without types) in
`headers["meta"]["media"]`; they move to the new column, typed `application/octet-stream`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '7c41e2a9d0f3'
down_revision: str | None = '7c1e5a9d2f40'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

message = sa.table(
    'message',
    sa.column('id', sa.Integer),
    sa.column('channel', sa.String),
    sa.column('headers', sa.JSON),
    sa.column('media', sa.JSON),
)


def upgrade() -> None:
    with op.batch_alter_table('message') as batch_op:
        batch_op.add_column(sa.Column('media', sa.JSON(), nullable=True))
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(message.c.id, message.c.headers).where(
            message.c.channel.in_(['sms', 'whatsapp']), message.c.headers.is_not(None)
        )
    )
    for row in rows.all():
        meta = (row.headers or {}).get('meta') or {}
        urls = meta.get('media') if isinstance(meta, dict) else None
        if not isinstance(urls, list) or not urls:
            continue
        media = [
            {'url': url, 'content_type': 'application/octet-stream', 'size': None,
             'state': 'declared'}
            for url in urls
            if isinstance(url, str)
        ]
        headers = {k: v for k, v in row.headers.items() if k != 'meta'}
        connection.execute(
            sa.update(message)
            .where(message.c.id == row.id)
            .values(media=media or None, headers=headers or None)
        )


def downgrade() -> None:
    with op.batch_alter_table('message') as batch_op:
        batch_op.drop_column('media')
