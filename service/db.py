"""The engine and sessions: one place that knows which database is behind the URL.

SQLite gets WAL (readers never block the writer), a busy timeout, foreign keys (off by default
in SQLite, and cascade delete needs them) and `BEGIN IMMEDIATE`, so a transaction that reads then
writes waits for the lock instead of failing with "database is locked" half-way. Transactions
that only read go through `reader(engine)` and begin DEFERRED: they never wait for the write
lock, so `/healthz`, `/metrics`, transcripts and the API answer while a writer holds it.

Pools. On SQLite a process writes through one connection (SQLite has one writer anyway): its
writers, the webhooks' inbound writer among them, queue for it in the pool, in order and
without burning CPU, instead of each taking a connection and sleeping in SQLite's busy handler
(which wakes in steps of up to 100 ms, so a second connection of the same process would find
the lock free only by luck between back-to-back batches: a reviewer measured webhooks waiting
seconds, then failing "database is locked"). The reply jobs' writes go through the engine's
group commit (`service/group_commit.py`), one checkout a batch, so a webhook's batch waits
behind at most the batch in progress; and the hot path's transactions (`inline`,
`begin_inline`) hold the connection only while they run, not across a turn of the event loop
(but for a first statement that finds the lock taken and the commit that checkpoints, which
make their trip to the thread: `sqlite_dialect`). Readers have a pool of their own (`reader`). On
PostgreSQL the pool is sized from the worker's concurrency (`settings.pool_size`); the group
commit holds one connection a batch, never during a model call or a send, so a few
connections serve hundreds of jobs in flight. There is no pre-ping: a connection that broke
fails the one transaction that meets it, and the job attempt is retried like any other
failure (the group commit tries its batch once more); the pool replaces the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from sqlalchemy import event, func, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from service import sqlite_dialect
from service.settings import Settings

SQLITE_BUSY_TIMEOUT_MS = 10_000
SQLITE_WAL_LIMIT_BYTES = 64 * 1024 * 1024  # a WAL grown past it is cut back when it starts over
READ_ONLY = "parley_read_only"  # execution option: this connection's transactions only read
INLINE = "parley_inline"  # execution option: a few small statements on indexes (`inline`)
SQLITE_READERS = 4  # connections for SQLite's readers (each is a thread in aiosqlite)
IDLE_IN_TRANSACTION_S = 10.0  # PostgreSQL ends a session idle that long inside a transaction
POOL_TIMEOUT_S = 60.0  # waiting for a connection: hundreds of jobs may queue for a few
_readers: weakref.WeakKeyDictionary[Engine, AsyncEngine] = weakref.WeakKeyDictionary()
T = TypeVar("T")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def engine_of(settings: Settings) -> AsyncEngine:
    """The engine `settings` describe: their URL, their PostgreSQL pool and its sessions' limit
    on idling inside a transaction; what every command of a process opens."""
    return create_engine(
        settings.database_url,
        connections=settings.database_connections,
        idle_in_transaction_s=settings.db_idle_in_transaction_s,
    )


def create_engine(
    database_url: str,
    *,
    connections: int = 10,
    idle_in_transaction_s: float = IDLE_IN_TRANSACTION_S,
    **kwargs: Any,
) -> AsyncEngine:
    """The process's engine; `connections` is the PostgreSQL pool's size
    (`Settings.database_connections`), `idle_in_transaction_s` how long PostgreSQL lets one
    of its sessions sit idle inside a transaction (`DB_IDLE_IN_TRANSACTION_S`; 0: the
    server's own setting)."""
    url = make_url(database_url)
    kwargs.setdefault("pool_timeout", POOL_TIMEOUT_S)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, kwargs)
    kwargs.setdefault("pool_size", connections)
    kwargs.setdefault("max_overflow", 0)  # closing overflow connections on return is churn
    kwargs.setdefault("pool_pre_ping", False)
    if url.get_driver_name() == "asyncpg" and idle_in_transaction_s > 0:
        # A process frozen inside a transaction (SIGSTOP, a paused container or VM) keeps its
        # row locks: a lease renewal's lock would hide its jobs from every other worker's
        # requeue (SKIP LOCKED) for as long as it stays frozen. PostgreSQL ends the session
        # instead. Parley's transactions are a few statements, never open across a model
        # call or a send, so nothing of its own sits idle in one for that long. (A startup
        # parameter: PgBouncer refuses it unless told to ignore it; set it on the role there.)
        connect_args = dict(kwargs.get("connect_args", {}))
        server_settings = dict(connect_args.get("server_settings", {}))
        timeout_ms = str(round(idle_in_transaction_s * 1000))
        server_settings.setdefault("idle_in_transaction_session_timeout", timeout_ms)
        kwargs["connect_args"] = {**connect_args, "server_settings": server_settings}
    return create_async_engine(url, **kwargs)


def _sqlite_engine(url: Any, kwargs: dict[str, Any]) -> AsyncEngine:
    """The writers' engine (one connection, shared by every writer of the process, the
    webhooks' included), with its readers' engine registered for `reader`. A memory database
    (tests) keeps SQLAlchemy's own pool: it is one connection already. aiosqlite URLs get the
    one-trip dialect (`sqlite_dialect`)."""
    if url.get_driver_name() == "aiosqlite":
        url = url.set(drivername=f"sqlite+{sqlite_dialect.DRIVER}")
    if url.database in (None, "", ":memory:") or "poolclass" in kwargs:
        engine = create_async_engine(url, **kwargs)
        _configure_sqlite(engine)
        return engine
    engine = create_async_engine(url, pool_size=1, max_overflow=0, **kwargs)
    _configure_sqlite(engine)
    readers = create_async_engine(url, pool_size=SQLITE_READERS, max_overflow=0, **kwargs)
    _configure_sqlite(readers)
    _readers[engine.sync_engine] = readers.execution_options(**{READ_ONLY: True})

    @event.listens_for(engine.sync_engine, "engine_disposed")
    def _dispose_readers(_engine: Engine) -> None:
        readers.sync_engine.dispose()  # runs inside `AsyncEngine.dispose`'s greenlet

    return engine


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
        # The dialect checkpoints every so many commits, in aiosqlite's thread (`sqlite_dialect`):
        # SQLite's own would run in whichever COMMIT it falls on, some of them on the loop's.
        cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_LIMIT_BYTES}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        options = connection.get_execution_options()
        read_only = bool(options.get(READ_ONLY))
        driver = connection.connection.dbapi_connection
        # Every SQLite engine here is aiosqlite's, so the one-trip dialect's (`_sqlite_engine`).
        assert isinstance(driver, sqlite_dialect.OneTripConnection)
        driver.begin_with_next_statement(  # no trip of its own
            "BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE",
            inline=bool(options.get(INLINE)),
            writes=not read_only,
        )


def reader(engine: AsyncEngine) -> AsyncEngine:
    """The engine for transactions that only read: on SQLite the readers' pool, whose
    transactions begin DEFERRED (in WAL mode such a reader sees the last commit and never waits
    for a writer); elsewhere the same engine. Nothing may write through it: a deferred
    transaction that then writes fails with "database is locked" when another writer is
    active, instead of waiting its turn."""
    readers = _readers.get(engine.sync_engine)
    if readers is not None:
        return readers
    return engine.execution_options(**{READ_ONLY: True})


def inline(engine: AsyncEngine) -> AsyncEngine:
    """`engine` (or `reader(engine)`) for transactions of a few small statements on indexes,
    the hot path's: the reply jobs' units, the webhooks' batches, lease renewals, the claims'
    takes. On SQLite their statements and COMMIT run on the event loop's thread, without a
    trip to aiosqlite's (`sqlite_dialect`); elsewhere it changes nothing. A statement that may
    scan a table does not belong in one: it would hold the loop for as long as it runs."""
    return engine.execution_options(**{INLINE: True})


@contextlib.asynccontextmanager
async def connect_inline(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """`inline(engine).connect()`, whose connection goes back to the pool the moment the block
    ends well. SQLAlchemy's own `connect()` block closes the connection in a task of its own,
    so that a cancellation cannot cut the close short; on SQLite's one writer connection that
    kept it checked out for another turn of the event loop after the COMMIT, with every other
    writer of the process queued for it. After an inline transaction the close makes no trip
    (there is nothing to roll back) and cannot be cut short, so it is awaited here; after an
    error it is shielded, as SQLAlchemy's is. PostgreSQL keeps SQLAlchemy's block (its pool's
    reset on return is a round trip)."""
    if engine.dialect.name != "sqlite":
        async with engine.connect() as connection:
            yield connection
        return
    connection = await inline(engine).connect().start()
    try:
        yield connection
    except BaseException:
        await asyncio.shield(connection.close())
        raise
    await connection.close()


@contextlib.asynccontextmanager
async def begin_inline(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """`inline(engine).begin()`: a transaction on `connect_inline`'s connection."""
    async with connect_inline(engine) as connection, connection.begin():
        yield connection


def unindexed(column: Any) -> Any:
    """`column` as an expression SQLite's planner cannot look up in the column's own index.

    For a test on a column of few values (a status), or a range (a due time), beside a
    selective one (a conversation): SQLite plans from the schema alone (Parley never runs
    `ANALYZE`) and may pick the status index, which holds every waiting row of every
    conversation, over the conversation's, which holds a handful. The statements of inline
    transactions must not (`inline`); tests/acceptance/test_query_plans.py asks SQLite for
    their plans. `coalesce(c, c)` is `c` on every database, of its own type."""
    return func.coalesce(column, column)


def per_dialect(build: Callable[[Any], T]) -> dict[str, T]:
    """`build(dialect)` for each database Parley runs on, keyed by dialect name: statements
    with a dialect's own `INSERT … ON CONFLICT`, built once at import and picked by
    `connection.dialect.name`, so a call only binds its values."""
    return {"postgresql": build(postgresql), "sqlite": build(sqlite)}


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
