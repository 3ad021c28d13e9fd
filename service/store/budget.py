"""`MODEL_CALLS_LIMIT`: the most model calls the whole deployment makes per window.

The windows are fixed (an hour from each full hour UTC, for `N/hour`), counted in one database
row each (`model_call_window`), so every process of a deployment draws on the same count.
A process takes its places in blocks (`block_size`: a thousandth of the limit, from 1 to
64), one short unit of a write transaction a block (a `GroupCommit` of the budget's own: the
takes of the moment share one short transaction, not the reply side's longer ones, whose lock
on the row would hold every other process's takes), and hands them out to its model calls
one by one; one block is asked for at a time, and calls that need a place meanwhile wait for
it (places taken one by one, under a limit of 2,000, are asked for together, in one batch).
At low rates that spares most replies a write transaction of their own:

1. `INSERT … ON CONFLICT DO NOTHING` the window's row (the first call of a window makes it),
   until this process has seen it committed: from then on the row is there, since only
   windows a day old are pruned;
2. `UPDATE … SET calls = calls + n WHERE calls + n <= limit`: granted when a row was
   updated; a block refused asks again for one place, so the last places of a window are
   still handed out one at a time.

The conditional UPDATE is atomic (PostgreSQL locks the row and re-checks the condition after
waiting; SQLite has one writer), so processes racing for the last place cannot both get it:
no overshoot. A place is taken *before* the call, so it counts even if the call then fails (a
failed call may cost too) or the process dies first (a lost place, never an extra call). The
places of a block a process has not used when its window ends (or it stops) are lost the
same way: a deployment makes at most the limit's calls in a window, and at least the limit
less `block_size - 1` a process (0.1 % of it).
A fixed window lets up to twice the limit through across one boundary (the end of one window
and the start of the next); that is the price of an O(1) check.

Once a process sees its window full it refuses without asking the database until the window
ends (a full window stays full). The first refusal in a window, deployment-wide, marks the row
(`warned_at`) and logs the one warning.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, bindparam, delete, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db import per_dialect, utcnow
from service.group_commit import GroupCommit
from service.models import ModelCallWindow
from service.settings import RateLimit

log = logging.getLogger(__name__)

KEEP_HISTORY = dt.timedelta(days=1)  # windows older than this (and than one window) are pruned

_WINDOWS = cast(Table, ModelCallWindow.__table__)
_W = _WINDOWS.c
# Built once (every model call takes a place): the window's row, then the conditional UPDATE.
_CREATE: dict[str, Any] = per_dialect(
    lambda dialect: (
        dialect.insert(_WINDOWS)
        .values(
            window_s=bindparam("w_s"),
            window_start=bindparam("w_start"),
            calls=0,
            created_at=bindparam("now"),
        )
        .on_conflict_do_nothing()
    )
)
_TAKE = (
    update(_WINDOWS)
    .where(
        _W.window_s == bindparam("w_s"),
        _W.window_start == bindparam("w_start"),
        _W.calls + bindparam("n") <= bindparam("limit"),
    )
    .values(calls=_W.calls + bindparam("n"))
)
MAX_BLOCK = 64


def block_size(limit: RateLimit) -> int:
    """How many places a process takes at once: a thousandth of the limit, 1 to `MAX_BLOCK`
    (a small limit is counted exactly, call by call)."""
    return max(1, min(MAX_BLOCK, limit.count // 1000))


def window_start(moment: dt.datetime, window_s: int) -> dt.datetime:
    """The start of the fixed window holding `moment`: windows begin at multiples of their
    length since the epoch (full hours for `/hour`, midnight UTC for `/day`)."""
    seconds = int(moment.timestamp())
    return dt.datetime.fromtimestamp(seconds - seconds % window_s, dt.UTC)


class ModelCallBudget:
    """One process's handle on the deployment's model-call budget."""

    def __init__(self, engine: AsyncEngine, limit: RateLimit | None, setting: str) -> None:
        self._engine = engine
        self._limit = limit
        self._setting = setting  # as configured, for the warning
        self._full_window: dt.datetime | None = None
        self._known_window: dt.datetime | None = None  # its row committed: no INSERT needed
        # Batches of their own, not the reply side's: on PostgreSQL a take locks the window's one
        # row until its transaction commits, and a long shared batch would hold every other
        # process's takes (and so their batches) behind it.
        self._takes = GroupCommit(engine)
        self._block = block_size(limit) if limit is not None else 1
        self._places = 0  # taken in the database for `_places_window`, not handed out yet
        self._places_window: dt.datetime | None = None
        self._refill = asyncio.Lock()  # one block asked for at a time

    async def take(self) -> bool:
        """A place for one model call in the current window; False when the window is full."""
        if self._limit is None:
            return True
        now = utcnow()
        start = window_start(now, self._limit.window_s)
        if self._hand_out(start):
            return True
        if self._block == 1:  # nothing to hand out later: concurrent takes share a batch
            return await self._take_block(start, now)
        async with self._refill:
            if self._hand_out(start):  # another call's block came in meanwhile
                return True
            return await self._take_block(start, now)

    def _hand_out(self, start: dt.datetime) -> bool:
        if self._places_window != start or self._places <= 0:
            return False
        self._places -= 1
        return True

    async def _take_block(self, start: dt.datetime, now: dt.datetime) -> bool:
        assert self._limit is not None
        if start == self._full_window:
            return False
        taken, first = await self._takes.run(
            functools.partial(self._take_or_refuse, start=start, now=now)
        )
        self._known_window = start  # committed (a unit that raised would have raised here)
        if taken:
            self._places, self._places_window = taken - 1, start
            return True
        self._full_window = start
        if first:
            log.warning(
                "MODEL_CALLS_LIMIT (%s) reached: no model calls until %s; messages meanwhile "
                "are stored and marked rate_limited",
                self._setting,
                (start + dt.timedelta(seconds=self._limit.window_s)).isoformat(),
            )
        return False

    async def _take_or_refuse(
        self, connection: AsyncConnection, start: dt.datetime, now: dt.datetime
    ) -> tuple[int, bool]:
        """(places granted, this is the window's first refusal anywhere in the deployment)."""
        for places in dict.fromkeys((self._block, 1)):  # a block; the window's last places
            if await self._take(connection, start, now, places):
                return places, False
        return 0, await self._mark_warned(connection, start, now)

    def _key(self, start: dt.datetime) -> tuple[ColumnElement[bool], ...]:
        assert self._limit is not None
        return (
            ModelCallWindow.window_s == self._limit.window_s,
            ModelCallWindow.window_start == start,
        )

    async def _take(
        self, connection: AsyncConnection, start: dt.datetime, now: dt.datetime, places: int
    ) -> bool:
        assert self._limit is not None
        key = {"w_s": self._limit.window_s, "w_start": start}
        if start != self._known_window:
            await self._create(connection, key, now)
        take = {**key, "limit": self._limit.count, "n": places}
        taken = await connection.execute(_TAKE, take)
        if not taken.rowcount and start == self._known_window and places == 1:
            # Full, or the row is gone (deleted by an operator, a restored database): make it
            # again if need be, rather than refuse every call until the window ends.
            await self._create(connection, key, now)
            taken = await connection.execute(_TAKE, take)
        return bool(taken.rowcount)

    async def _create(self, connection: AsyncConnection, key: dict[str, Any], now: Any) -> None:
        created = await connection.execute(_CREATE[connection.dialect.name], {**key, "now": now})
        if created.rowcount:  # the window's first call: forget the old ones
            await self._prune(connection, key["w_start"])

    async def _mark_warned(
        self, connection: AsyncConnection, start: dt.datetime, now: dt.datetime
    ) -> bool:
        """Whether this is the window's first refusal anywhere in the deployment."""
        marked = await connection.execute(
            update(ModelCallWindow)
            .where(*self._key(start), ModelCallWindow.warned_at.is_(None))
            .values(warned_at=now)
        )
        return bool(marked.rowcount)

    async def _prune(self, connection: AsyncConnection, start: dt.datetime) -> None:
        assert self._limit is not None
        keep = max(KEEP_HISTORY, dt.timedelta(seconds=self._limit.window_s))
        await connection.execute(
            delete(ModelCallWindow).where(ModelCallWindow.window_start < start - keep)
        )
