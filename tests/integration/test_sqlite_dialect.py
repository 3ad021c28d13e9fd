"""The one-trip SQLite dialect (`service.sqlite_dialect`) behaves as the stock aiosqlite one:
rows, row counts, many rows at once, streamed results, the database's errors, and a file's
transactions seen by a second connection. Inline transactions (`db.inline`) run their
statements and their COMMIT on the event loop's thread without yielding to it, yet one that
must wait for a lock waits in aiosqlite's thread, with the loop free meanwhile, and the
checkpoints run there too."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import event, exc, text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import begin_inline, create_engine, inline, reader
from service.sqlite_dialect import CHECKPOINT_EVERY, CHECKPOINT_RETRY


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'one-trip.db'}")
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE)"))
    yield engine
    await engine.dispose()


async def test_the_url_picks_the_one_trip_dialect(engine: AsyncEngine) -> None:
    assert engine.dialect.driver == "parley_aiosqlite"
    assert engine.dialect.supports_statement_cache


async def test_rows_counts_and_returning(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        inserted = await connection.execute(
            text("INSERT INTO t (v) VALUES (:v) RETURNING id"), {"v": "a"}
        )
        assert inserted.scalar_one() == 1
        many = await connection.execute(
            text("INSERT INTO t (v) VALUES (:v)"), [{"v": "b"}, {"v": "c"}, {"v": "d"}]
        )
        assert many.rowcount == 3
        updated = await connection.execute(text("UPDATE t SET v = v || '!' WHERE id > 2"))
        assert updated.rowcount == 2
    async with engine.connect() as connection:
        rows = (await connection.execute(text("SELECT id, v FROM t ORDER BY id"))).all()
    assert [tuple(row) for row in rows] == [(1, "a"), (2, "b"), (3, "c!"), (4, "d!")]


async def test_a_streamed_result_reads_every_row(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            text("INSERT INTO t (v) VALUES (:v)"), [{"v": str(i)} for i in range(250)]
        )
    async with engine.connect() as connection:
        result = await connection.stream(text("SELECT v FROM t ORDER BY id"))
        seen = [row.v async for row in result]
    assert seen == [str(i) for i in range(250)]


async def test_the_databases_refusal_is_sqlalchemys_error_and_rolls_back(
    engine: AsyncEngine,
) -> None:
    with pytest.raises(exc.IntegrityError):
        async with engine.begin() as connection:
            await connection.execute(text("INSERT INTO t (v) VALUES ('x')"))
            await connection.execute(text("INSERT INTO t (v) VALUES ('x')"))
    with pytest.raises(exc.OperationalError):
        async with engine.connect() as connection:
            await connection.execute(text("SELECT nope FROM t"))
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT count(*) FROM t"))).scalar() == 0


async def test_a_write_transaction_holds_the_write_lock_from_its_first_statement(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """BEGIN IMMEDIATE travels with the transaction's first statement, even a read: another
    writer is kept out from then on, so a read-then-write never fails half-way."""
    other = sqlite3.connect(tmp_path / "one-trip.db", timeout=0.05, isolation_level=None)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("SELECT count(*) FROM t"))
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            await connection.execute(text("INSERT INTO t (v) VALUES ('mine')"))
        other.execute("BEGIN IMMEDIATE")  # free again after the commit
        other.execute("ROLLBACK")
    finally:
        other.close()
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT v FROM t"))).scalars().all() == ["mine"]


async def test_a_stream_opening_a_write_transaction_holds_the_write_lock(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """A streamed statement first in a transaction still sends the BEGIN IMMEDIATE."""
    other = sqlite3.connect(tmp_path / "one-trip.db", timeout=0.05, isolation_level=None)
    try:
        async with engine.begin() as connection:
            result = await connection.stream(text("SELECT v FROM t"))
            assert [row async for row in result] == []
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
    finally:
        other.close()


def _thread_of(dbapi_connection: object, _record: object) -> None:
    """`SELECT thread()` in SQL: the thread that runs the statement."""
    raw = dbapi_connection._connection._conn  # type: ignore[attr-defined]
    raw.create_function("thread", 0, threading.get_ident)


async def _statement_thread(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text("SELECT thread()"))).scalar_one())


async def test_inline_transactions_run_on_the_loops_thread_and_others_do_not(
    engine: AsyncEngine,
) -> None:
    await engine.dispose()  # connections made from here on get `thread()`
    for pool in (engine, reader(engine)):
        event.listen(pool.sync_engine, "connect", _thread_of)
    loop_thread = threading.get_ident()
    assert await _statement_thread(inline(engine)) == loop_thread
    assert await _statement_thread(inline(reader(engine))) == loop_thread
    assert await _statement_thread(engine) != loop_thread
    assert await _statement_thread(reader(engine)) != loop_thread
    async with engine.connect() as connection:  # inline only for its own transaction
        assert (await connection.execute(text("SELECT thread()"))).scalar_one() != loop_thread


class _Ticker:
    """Counts the turns of the event loop that reach a task sleeping `every_s` at a time."""

    def __init__(self, every_s: float) -> None:
        self.ticks = 0
        self._task = asyncio.create_task(self._run(every_s))

    async def _run(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.ticks += 1

    def cancel(self) -> None:
        self._task.cancel()


async def test_an_inline_write_waits_for_the_lock_off_the_loop(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """Another process holds the write lock: the inline transaction's BEGIN IMMEDIATE waits in
    the thread (the busy timeout), the loop keeps running, and the write lands once it is free."""
    other = sqlite3.connect(tmp_path / "one-trip.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")

    async def write() -> None:
        async with inline(engine).begin() as connection:
            await connection.execute(text("INSERT INTO t (v) VALUES ('after the lock')"))

    ticker = _Ticker(every_s=0.01)
    writing = asyncio.create_task(write())
    started = time.monotonic()
    await asyncio.sleep(0.3)
    assert not writing.done()
    assert ticker.ticks >= 10, "the event loop stalled while the write waited for the lock"
    other.execute("ROLLBACK")
    other.close()
    await asyncio.wait_for(writing, 5)
    ticker.cancel()
    assert time.monotonic() - started >= 0.3
    async with engine.connect() as connection:
        rows = (await connection.execute(text("SELECT v FROM t"))).scalars().all()
    assert rows == ["after the lock"]


async def test_an_inline_transactions_later_statements_and_errors_behave_as_usual(
    engine: AsyncEngine,
) -> None:
    with pytest.raises(exc.IntegrityError):
        async with inline(engine).begin() as connection:
            await connection.execute(text("INSERT INTO t (v) VALUES ('x')"))
            await connection.execute(text("INSERT INTO t (v) VALUES ('x')"))
    async with inline(engine).begin() as connection:
        await connection.execute(text("INSERT INTO t (v) VALUES ('y')"))
        assert (await connection.execute(text("SELECT count(*) FROM t"))).scalar() == 1
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT v FROM t"))).scalars().all() == ["y"]
        busy = (await connection.execute(text("PRAGMA busy_timeout"))).scalar()
    assert busy == 10_000  # set back after the inline BEGIN


def _trace_statements(into: list[tuple[str, int]]) -> object:
    """A `connect` listener: each statement the connection runs, with the thread running it."""

    def listen(dbapi_connection: object, _record: object) -> None:
        raw = dbapi_connection._connection._conn  # type: ignore[attr-defined]
        raw.set_trace_callback(lambda sql: into.append((sql.split()[0], threading.get_ident())))

    return listen


async def test_an_inline_transaction_commits_on_the_loops_thread_without_yielding(
    engine: AsyncEngine,
) -> None:
    """Its COMMIT too: the one writer connection is never held while the loop runs other work
    (the webhooks' and the reply jobs' writes queue for it)."""
    await engine.dispose()
    statements: list[tuple[str, int]] = []
    for pool in (engine, reader(engine)):
        event.listen(pool.sync_engine, "connect", _trace_statements(statements))
    for pool in (inline(engine), inline(reader(engine))):  # connections made, pooled
        async with pool.connect() as connection:
            await connection.execute(text("SELECT 1"))
    ticker = _Ticker(every_s=0)
    await asyncio.sleep(0.01)
    statements.clear()
    before = ticker.ticks
    async with begin_inline(engine) as connection:
        await connection.execute(text("INSERT INTO t (v) VALUES ('a')"))
        await connection.execute(text("UPDATE t SET v = 'b'"))
    async with begin_inline(reader(engine)) as connection:
        assert (await connection.execute(text("SELECT v FROM t"))).scalar_one() == "b"
    assert ticker.ticks == before, "the event loop ran something while the transactions were open"
    ticker.cancel()
    loop_thread = threading.get_ident()
    verbs = [verb for verb, _ in statements if verb != "PRAGMA"]  # the inline busy timeout's
    assert verbs == ["BEGIN", "INSERT", "UPDATE", "COMMIT", "BEGIN", "SELECT", "COMMIT"]
    assert {thread for _, thread in statements} == {loop_thread}


async def test_every_so_many_write_transactions_a_checkpoint_runs_in_the_thread(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """SQLite's automatic checkpoint is off; the dialect's copies the WAL into the database
    file after each `CHECKPOINT_EVERY`-th write transaction, in aiosqlite's thread, and tries
    again `CHECKPOINT_RETRY` later when a reader kept it from copying everything."""
    await engine.dispose()
    statements: list[tuple[str, int]] = []
    event.listen(engine.sync_engine, "connect", _trace_statements(statements))
    database = tmp_path / "one-trip.db"
    loop_thread = threading.get_ident()
    rows = itertools.count()

    async def write(count: int) -> list[str]:
        """`count` write transactions of a 5,000-byte row; what ran in aiosqlite's thread."""
        statements.clear()
        for _ in range(count):
            async with begin_inline(engine) as connection:
                row = {"v": f"{next(rows)}".ljust(5000, "x")}
                await connection.execute(text("INSERT INTO t (v) VALUES (:v)"), row)
        return [verb for verb, thread in statements if thread != loop_thread]

    assert await write(1) == []  # the connection made: its first write transaction counted
    size = database.stat().st_size
    old_reader = sqlite3.connect(database, isolation_level=None)
    old_reader.execute("BEGIN")
    old_reader.execute("SELECT count(*) FROM t").fetchall()  # holds the WAL as it is now
    assert await write(CHECKPOINT_EVERY - 2) == []
    assert database.stat().st_size == size, "written to the database file before a checkpoint"
    assert await write(1) == ["COMMIT", "PRAGMA"]  # then `wal_checkpoint(PASSIVE)`
    assert database.stat().st_size < size + 10 * 5000, "copied what the old reader still reads"
    old_reader.execute("ROLLBACK")
    old_reader.close()
    assert await write(CHECKPOINT_RETRY - 1) == []
    assert await write(1) == ["COMMIT", "PRAGMA"]  # tried again, sooner
    assert database.stat().st_size > size + (CHECKPOINT_EVERY + CHECKPOINT_RETRY - 2) * 5000
    async with engine.connect() as connection:
        assert (await connection.execute(text("PRAGMA wal_autocheckpoint"))).scalar() == 0
        limit = (await connection.execute(text("PRAGMA journal_size_limit"))).scalar()
    assert limit == 64 * 1024 * 1024
