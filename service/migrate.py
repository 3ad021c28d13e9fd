"""Bring the schema to the latest Alembic revision.

Several processes may start at once against one PostgreSQL (`parley serve` replicas and
`parley worker`s): a transaction-scoped advisory lock makes the first one migrate while the
others wait, then find nothing left to do.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATION_LOCK_KEY = 0x7061726C6579  # "parley"

_ROOT = Path(__file__).resolve().parent.parent


def alembic_config() -> Config:
    """The project's `alembic.ini`, found beside the package (checkout, image) or in the cwd."""
    for folder in (_ROOT, Path.cwd()):
        ini = folder / "alembic.ini"
        if ini.exists():
            return Config(str(ini))
    raise FileNotFoundError("alembic.ini not found beside the service package or in the cwd")


def _upgrade(connection: Connection, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade, revision)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await connection.run_sync(_current)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
