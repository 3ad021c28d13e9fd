"""`GroupCommit` on a real database: units handed in together share one transaction and each
caller hears of its unit only once it is committed; a unit that raises fails alone, leaving
nothing of itself behind; a batch never grows past its bound; a cancelled caller neither
loses its neighbours' writes nor leaves a batch half done; a dead pooled connection is
replaced without failing anyone. Reads handed in together share a read transaction and see
every commit made before them."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event, exc, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db import create_engine, reader, utcnow
from service.group_commit import GroupCommit, Unit, group_commit, group_read
from service.migrate import upgrade
from service.models import DeliveryReport
from tests.conftest import _pg_admin


class Refused(Exception):
    """A unit's own reason to give up, raised after it wrote."""


def storing(sid: str, then_raise: bool = False) -> Unit[str]:
    """A unit that stores a delivery report named `sid` and returns `sid`."""

    async def unit(connection: AsyncConnection) -> str:
        await connection.execute(
            insert(DeliveryReport).values(
                created_at=utcnow(), channel="sms", provider_message_id=sid, status="sent"
            )
        )
        if then_raise:
            raise Refused(sid)
        return sid

    return unit


async def stored(engine: AsyncEngine) -> list[str]:
    """The reports another connection sees: only what was committed."""
    async with reader(engine).connect() as connection:
        rows = await connection.scalars(select(DeliveryReport.provider_message_id))
        return sorted(rows)


@pytest.fixture
def commits(engine: AsyncEngine) -> Iterator[list[int]]:
    """One entry per COMMIT on the engine."""
    seen: list[int] = []

    def count(_connection: object) -> None:
        seen.append(1)

    event.listen(engine.sync_engine, "commit", count)
    yield seen
    event.remove(engine.sync_engine, "commit", count)


async def test_units_handed_in_together_commit_once_and_answer_after_the_commit(
    engine: AsyncEngine, commits: list[int]
) -> None:
    batcher = GroupCommit(engine)

    async def run_then_look(sid: str) -> tuple[str, bool]:
        result = await batcher.run(storing(sid))
        return result, sid in await stored(engine)  # committed by the time we hear of it

    results = await asyncio.gather(*(run_then_look(f"r{i}") for i in range(10)))

    assert results == [(f"r{i}", True) for i in range(10)]
    assert len(commits) == 1


async def test_a_unit_that_raises_fails_alone_and_leaves_nothing_behind(
    engine: AsyncEngine,
) -> None:
    batcher = GroupCommit(engine)

    results = await asyncio.gather(
        batcher.run(storing("before")),
        batcher.run(storing("refused", then_raise=True)),
        batcher.run(storing("after")),
        return_exceptions=True,
    )

    assert results[0] == "before" and results[2] == "after"
    assert isinstance(results[1], Refused)  # its own exception, as if it ran alone
    assert await stored(engine) == ["after", "before"]


async def test_a_batch_never_holds_more_units_than_its_bound(
    engine: AsyncEngine, commits: list[int]
) -> None:
    batcher = GroupCommit(engine, max_units=4)

    results = await asyncio.gather(*(batcher.run(storing(f"r{i:02d}")) for i in range(10)))

    assert results == [f"r{i:02d}" for i in range(10)]
    assert len(commits) == 3  # 4 + 4 + 2
    assert await stored(engine) == [f"r{i:02d}" for i in range(10)]


async def test_a_caller_cancelled_while_its_unit_runs_leaves_the_batch_whole(
    engine: AsyncEngine,
) -> None:
    batcher = GroupCommit(engine)
    running, go_on = asyncio.Event(), asyncio.Event()

    async def slow(connection: AsyncConnection) -> str:
        running.set()
        await go_on.wait()
        return await storing("slow")(connection)

    cancelled = asyncio.create_task(batcher.run(slow))
    neighbour = asyncio.create_task(batcher.run(storing("neighbour")))
    await running.wait()
    cancelled.cancel()
    go_on.set()

    assert await neighbour == "neighbour"
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await batcher.drained()
    # A unit once handed in is the batch's: it ran and committed with its neighbour.
    assert await stored(engine) == ["neighbour", "slow"]


async def test_units_after_a_batch_start_a_new_one(engine: AsyncEngine) -> None:
    batcher = group_commit(engine)
    assert group_commit(engine) is batcher  # one per engine in a process

    assert await batcher.run(storing("first")) == "first"
    await batcher.drained()
    assert await batcher.run(storing("second")) == "second"
    assert await stored(engine) == ["first", "second"]


async def test_after_a_database_restart_the_next_batch_is_stored_not_failed(
    engine: AsyncEngine, database_url: str
) -> None:
    if make_url(database_url).get_backend_name() != "postgresql":
        pytest.skip("a server restart drops pooled connections: a PostgreSQL case")
    batcher = GroupCommit(engine)
    assert await batcher.run(storing("before")) == "before"  # the pool holds a connection
    await _pg_admin(  # what a restart does to every pooled connection
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{make_url(database_url).database}' AND pid <> pg_backend_pid()"
    )

    results = await asyncio.gather(batcher.run(storing("a")), batcher.run(storing("b")))

    assert results == ["a", "b"]
    assert await stored(engine) == ["a", "b", "before"]


async def test_reads_handed_in_together_see_every_commit_made_before_them(
    engine: AsyncEngine,
) -> None:
    async def reports(connection: AsyncConnection) -> list[str]:
        return sorted(await connection.scalars(select(DeliveryReport.provider_message_id)))

    assert await group_read(engine).run(reports) == []
    await group_commit(engine).run(storing("first"))
    seen = await asyncio.gather(*(group_read(engine).run(reports) for _ in range(5)))
    await group_commit(engine).run(storing("second"))
    after = await group_read(engine).run(reports)

    assert seen == [["first"]] * 5
    assert after == ["first", "second"]


async def test_a_locked_sqlite_database_fails_the_batch_once_not_unit_by_unit(
    tmp_path: Path,
) -> None:
    """Another process holds SQLite's write lock past the busy timeout: the batch's BEGIN (it
    travels with the first unit's statement) fails every caller with the database's error
    after one wait, instead of each unit waiting out the timeout again alone."""
    path = tmp_path / "locked.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    event.listen(
        engine.sync_engine,
        "connect",
        lambda dbapi, _record: dbapi.cursor().execute("PRAGMA busy_timeout=200"),
    )
    await upgrade(engine)
    started: list[str] = []

    def counted(sid: str) -> Unit[str]:
        unit = storing(sid)

        async def run(connection: AsyncConnection) -> str:
            started.append(sid)
            return await unit(connection)

        return run

    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        batch = GroupCommit(engine)
        began = time.monotonic()
        outcomes = await asyncio.gather(
            *(batch.run(counted(f"SM{i}")) for i in range(8)), return_exceptions=True
        )
        waited = time.monotonic() - began
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        await engine.dispose()
    assert all(isinstance(o, exc.OperationalError) for o in outcomes), outcomes
    assert started == ["SM0"]  # the others never ran, nor ran again alone
    assert waited < 8 * 0.2
