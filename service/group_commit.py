"""Group commit: what many tasks hand in while a transaction is open goes into the next one.

A transaction costs far more than the few statements of a reply job's step: a pool checkout,
a BEGIN (on SQLite `BEGIN IMMEDIATE`, which queues for the one writer), a COMMIT (a WAL sync)
and the thread and greenlet hops of each. With hundreds of jobs in flight, many of their
steps are ready in the same event-loop tick; `GroupCommit` runs them one after the other in
one transaction and commits once.

`Batcher` is the part every group commit shares (the webhooks' `InboundWriter` too): callers
`submit` an item and wait; one task writes whatever was handed in, up to `max_batch` items at
a time, while the next items gather; each caller gets its result only once its batch has
committed. A batch that fails is written again one item at a time when one item may be to
blame, so a bad item fails alone and its neighbours are stored as if alone. A caller that is
cancelled while it waits does not take its item out of the batch (only its future is
cancelled): the batch task alone decides what is written, so a cancellation never leaves a
batch half done. The task exists only while there is work: an idle process holds no task and no
connection, and there is nothing to start or stop.

`GroupCommit` is the batcher whose items are units of work, `async (AsyncConnection) -> T`:

- a unit runs inside the batch's transaction and must not do anything outside the database
  that cannot be done twice: when a unit raises, the batch is rolled back and every unit of it
  runs again alone, in its own transaction, so the one that raised gets its own exception,
  exactly as if it had never been batched (a control-flow exception such as `outbox`'s
  "answered elsewhere" keeps its meaning, and the rollback of its writes);
- a connection found dead (`connection_invalidated`, a database restart: pools skip the
  pre-ping) fails no unit: the batch is tried once more on a fresh connection;
- a failure outside the units (the checkout, the BEGIN, the COMMIT) is every caller's, as it
  would have been each caller's alone: nothing is run again, since a COMMIT that failed may
  have committed; so is the database's own `OperationalError` inside a unit (locked past the
  busy timeout, out of disk: no unit is to blame), which on SQLite is also where a busy BEGIN
  shows, since it travels with the first statement.

`group_read(engine)` is the same for units that only read (a reply job's state): they share
read transactions on `db.reader(engine)`; a batch begins after each of its units was handed
in, so each sees every commit made before it asked.

One `GroupCommit` serves an engine's whole process (`group_commit(engine)`), as its pool does:
the point is that every writer of the process shares the batches (on SQLite they queue for one
connection anyway), and its lifetime is the engine's. A kill -9 before a COMMIT loses the
batch's units, as it would have lost each one alone: their jobs are leased and run again.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db import connect_inline, reader

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
T = TypeVar("T")
Unit = Callable[[AsyncConnection], Awaitable[T]]

MAX_UNITS = 64  # a reply batch: long enough to share a commit, short enough to hold locks briefly


@dataclass
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    future: asyncio.Future[ResultT]


class Batcher(Generic[ItemT, ResultT]):
    """Write what is submitted in batches, each caller answered once its batch is written.

    `write(items)` writes a batch and returns one result per item, in order. When it raises,
    `alone_may_help(exc)` says whether writing the items one at a time could spare some (one
    item is to blame); otherwise, or for a batch of one, every caller gets `failure(exc)`."""

    def __init__(
        self,
        write: Callable[[list[ItemT]], Awaitable[list[ResultT]]],
        *,
        name: str,
        max_batch: int,
        alone_may_help: Callable[[Exception], bool] = lambda _exc: True,
        failure: Callable[[Exception], BaseException] = lambda exc: exc,
    ) -> None:
        self._write = write
        self._name = name
        self._max_batch = max_batch
        self._alone_may_help = alone_may_help
        self._failure = failure
        self._waiting: deque[_Pending[ItemT, ResultT]] = deque()
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: ItemT) -> ResultT:
        """`item`'s result, once its batch is written; its failure raised."""
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Pending(item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name)
        # A cancelled caller cancels only its future: its item stays in the batch, which the
        # batch task alone writes (`_settle` skips a future that is done already).
        return await future

    async def drained(self) -> None:
        """Return once everything submitted so far is written."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        while self._waiting:
            batch = [self._waiting.popleft()]
            while self._waiting and len(batch) < self._max_batch:
                batch.append(self._waiting.popleft())
            try:
                await self._write_batch(batch)
            except BaseException:  # cancelled (the loop is closing): nobody is answered
                for pending in batch:
                    pending.future.cancel()
                self._task = None
                raise
        self._task = None  # in the same step as the check above: a new item starts a new task

    async def _write_batch(self, batch: list[_Pending[ItemT, ResultT]]) -> None:
        try:
            results = await self._write([pending.item for pending in batch])
        except Exception as exc:  # noqa: BLE001 - handed to the callers, or written one by one
            if len(batch) > 1 and self._alone_may_help(exc):
                for pending in batch:
                    await self._write_batch([pending])
                return
            for pending in batch:
                _settle(pending.future, self._failure(exc))
            return
        for pending, result in zip(batch, results, strict=True):
            _settle(pending.future, result)


def _settle(future: asyncio.Future[T], outcome: T | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class _UnitFailed(Exception):
    """A unit raised (`__cause__`): the batch was rolled back, nothing of it committed."""


class _CommitUncertain(Exception):
    """The connection died during the COMMIT (`__cause__`): it may or may not have committed."""


class GroupCommit:
    """Units of work on one engine, run in shared transactions (see the module docstring);
    `reads`: units that only read, sharing read transactions on `db.reader(engine)`."""

    def __init__(
        self, engine: AsyncEngine, max_units: int = MAX_UNITS, *, reads: bool = False
    ) -> None:
        self._engine = weakref.ref(engine)  # `group_commit`'s registry must not keep it alive
        self._reads = reads
        self._batches: Batcher[Unit[Any], Any] = Batcher(
            self._commit,
            name="parley-group-commit",
            max_batch=max_units,
            alone_may_help=_one_unit_to_blame,
            failure=_unit_failure,
        )

    async def run(self, unit: Unit[T]) -> T:
        """`unit`'s result, once the transaction it ran in has committed."""
        result: T = await self._batches.submit(unit)
        return result

    async def drained(self) -> None:
        await self._batches.drained()

    async def _commit(self, units: list[Unit[Any]]) -> list[Any]:
        return await once_more_if_dead(lambda: self._transaction(units))

    async def _transaction(self, units: list[Unit[Any]]) -> list[Any]:
        engine = self._engine()
        assert engine is not None, "the engine is gone while its units run"
        async with connect_inline(reader(engine) if self._reads else engine) as connection:
            transaction = await connection.begin()
            try:
                results = [await unit(connection) for unit in units]
            except Exception as exc:  # leaving `connect()` rolls the transaction back
                if _dead(exc):
                    raise  # no unit is to blame, nothing was committed: `once_more_if_dead`
                raise _UnitFailed from exc
            try:
                await transaction.commit()
            except Exception as exc:
                if _dead(exc):  # it may have committed: never run again, every caller's
                    raise _CommitUncertain from exc
                raise
        return results


def _one_unit_to_blame(exc: Exception) -> bool:
    """Whether running the units alone could spare some: a unit raised, and not because of the
    database itself. An `OperationalError` is the database's (locked past the busy timeout, out
    of disk, too many connections); on SQLite a busy BEGIN surfaces as the first unit's error,
    since the BEGIN travels with its first statement (`sqlite_dialect`): running the batch
    again one by one would only wait for the lock once more per unit."""
    return isinstance(exc, _UnitFailed) and not isinstance(exc.__cause__, OperationalError)


def _dead(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


async def once_more_if_dead(attempt: Callable[[], Awaitable[T]]) -> T:
    """`attempt()` (a transaction), tried once more on a fresh connection when the pooled one
    turned out dead (a database restart: the pools skip the pre-ping round trip). Only for an
    attempt that is safe to make again: `GroupCommit` lets a dead connection through only from
    before its COMMIT; the inbound writer's messages deduplicate on their provider ids."""
    try:
        return await attempt()
    except Exception as exc:
        if not _dead(exc):
            raise
    return await attempt()


def _unit_failure(exc: Exception) -> BaseException:
    """What a caller sees: its unit's own exception, or the database's."""
    if isinstance(exc, _UnitFailed | _CommitUncertain) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


_Registry = weakref.WeakKeyDictionary[AsyncEngine, GroupCommit]
_group_commits: _Registry = weakref.WeakKeyDictionary()
_group_reads: _Registry = weakref.WeakKeyDictionary()


def group_commit(engine: AsyncEngine) -> GroupCommit:
    """The process's group commit on `engine` (made on first use, gone with the engine): every
    writer of the process shares its batches, as they share the engine's pool."""
    return _one_per_engine(_group_commits, engine, reads=False)


def group_read(engine: AsyncEngine) -> GroupCommit:
    """The process's batches of reads on `engine`: the reads ready at the same time share one
    read transaction on one reader connection. Each unit still sees every commit made before
    it was handed in (its batch begins after it)."""
    return _one_per_engine(_group_reads, engine, reads=True)


def _one_per_engine(registry: _Registry, engine: AsyncEngine, *, reads: bool) -> GroupCommit:
    found = registry.get(engine)
    if found is None:
        found = registry[engine] = GroupCommit(engine, reads=reads)
    return found
