"""assistant profiles and summary memory: the conversation's summary and its watermark, the
closed period answered after hours, which fixed text a message is, each call's purpose

Revision ID: 7c1e5a9d2f40
Revises: 5d3a9c0e7b21
Create Date: 2026-12-01 13:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '7c1e5a9d2f40'
down_revision: str | None = '5d3a9c0e7b21'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('conversation') as batch_op:
        batch_op.add_column(sa.Column('memory_summary', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('memory_through_id', Id, nullable=True))
        batch_op.add_column(sa.Column('after_hours_period', sa.String(length=40), nullable=True))
    with op.batch_alter_table('message') as batch_op:
        batch_op.add_column(sa.Column('fixed_kind', sa.String(length=16), nullable=True))
    with op.batch_alter_table('assistant_call') as batch_op:
        batch_op.add_column(
            sa.Column('purpose', sa.String(length=16), server_default='reply', nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table('assistant_call') as batch_op:
        batch_op.drop_column('purpose')
    with op.batch_alter_table('message') as batch_op:
        batch_op.drop_column('fixed_kind')
    with op.batch_alter_table('conversation') as batch_op:
        batch_op.drop_column('after_hours_period')
        batch_op.drop_column('memory_through_id')
        batch_op.drop_column('memory_summary')
