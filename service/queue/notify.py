"""Cross-process wake-ups on PostgreSQL: `NOTIFY` when jobs are committed, `LISTEN` in workers.

A worker in another process than the webhook that enqueued a job would otherwise find it only
at its next poll. Notifications are a hint, never the truth (the job table is): a lost one costs
at most one poll interval, so the listener simply reconnects after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

log = logging.getLogger(__name__)

CHANNEL = "parley_jobs"
RECONNECT_S = 2.0


async def notify_jobs(connection: AsyncConnection) -> None:
    """Inside the enqueueing transaction: PostgreSQL delivers it only if the commit happens."""
    if connection.dialect.name == "postgresql":
        await connection.execute(text(f"NOTIFY {CHANNEL}"))


def _asyncpg_dsn(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(False)


async def listen_for_jobs(database_url: str, wake: Callable[[], None]) -> None:
    """Call `wake` on every notification until cancelled; no-op on other databases."""
    if make_url(database_url).get_backend_name() != "postgresql":
        return
    import asyncpg  # PostgreSQL only

    while True:
        try:
            connection = await asyncpg.connect(_asyncpg_dsn(database_url))
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("LISTEN connection failed (%s); polling meanwhile", exc)
            await asyncio.sleep(RECONNECT_S)
            continue
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _c, lost=lost: lost.set())
        await connection.add_listener(CHANNEL, lambda *_args: wake())
        wake()  # anything committed while we were not listening
        try:
            await lost.wait()
            log.warning("LISTEN connection lost; reconnecting")
        finally:
            with contextlib.suppress(Exception):
                await connection.close()
