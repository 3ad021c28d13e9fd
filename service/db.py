"""The engine and sessions: one place that knows which database is behind the URL.

SQLite gets WAL (readers never block the writer), a busy timeout, foreign keys (off by default
in SQLite, and cascade delete needs them) and `BEGIN IMMEDIATE`, so a transaction that reads then
writes waits for the lock instead of failing with "database is locked" half-way. Transactions
that only read go through `reader(engine)` and begin DEFERRED: they never wait for the write
lock, so `/healthz`, `/metrics`, transcripts and the API answer while a writer holds it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

SQLITE_BUSY_TIMEOUT_MS = 10_000
READ_ONLY = "parley_read_only"  # execution option: this connection's transactions only read


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_engine(database_url: str, **kwargs: Any) -> AsyncEngine:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(url, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **kwargs)


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so that `begin` below decides how to BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if connection.get_execution_options().get(READ_ONLY):
            connection.exec_driver_sql("BEGIN DEFERRED")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def reader(engine: AsyncEngine) -> AsyncEngine:
    """The same engine and pool, for transactions that only read. On SQLite they begin
    DEFERRED: in WAL mode such a reader sees the last commit and never waits for a writer.
    Nothing may write through it: a deferred transaction that then writes fails with
    "database is locked" when another writer is active, instead of waiting its turn."""
    return engine.execution_options(**{READ_ONLY: True})


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def database_answers(engine: AsyncEngine) -> bool:
    """What `/healthz` reports: a read through the pool that needs no write lock. On SQLite
    it reads the schema page, so the file itself must answer (`SELECT 1` alone would not
    touch it)."""
    probe = "SELECT count(*) FROM sqlite_master" if engine.dialect.name == "sqlite" else "SELECT 1"
    try:
        async with reader(engine).connect() as connection:
            await connection.execute(text(probe))
        return True
    except Exception:  # noqa: BLE001 - any failure means "not healthy"
        return False
