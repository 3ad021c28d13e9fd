"""conversation public base URL (where its provider reached Parley, without PUBLIC_BASE_URL)

Revision ID: a9d4e6f1b2c8
Revises: e4b7c2a91d36
Create Date: 2026-12-02 08:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = 'a9d4e6f1b2c8'
down_revision: str | None = 'e4b7c2a91d36'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('conversation') as batch_op:
        batch_op.add_column(sa.Column('public_base_url', sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('conversation') as batch_op:
        batch_op.drop_column('public_base_url')
