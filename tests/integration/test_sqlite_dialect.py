"""The one-trip SQLite dialect (`service.sqlite_dialect`) behaves as the stock aiosqlite one:
rows, row counts, many rows at once, streamed results, the database's errors, and a file's
transactions seen by a second connection."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import create_engine


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
