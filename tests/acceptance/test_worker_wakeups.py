"""How the worker finds its work: a webhook's conversation by its id (the hint its commit
hands over), the whole queue after a poll's wait or when a job falls due, even while hints keep
waking it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.acceptance.test_pipeline import done, text
from tests.conftest import SettingsFactory, running_app
from tests.fakes import FakeProviders

ALICE = "+15550001234"


def _count_queue_reads(into: list[str]) -> Any:
    """A `before_cursor_execute` listener: the claims' reads of the whole queue."""

    def listen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "GROUP BY reply_job.conversation_id" in statement:
            into.append(statement)

    return listen


async def test_a_webhooks_conversation_is_claimed_by_its_id_without_reading_the_queue(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    providers: FakeProviders,
    database_url: str,
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("on PostgreSQL the commit's NOTIFY has every worker read the queue")
    reads: list[str] = []
    listen = _count_queue_reads(reads)
    event.listen(Engine, "before_cursor_execute", listen)
    try:
        async with running_app(make_settings(worker_poll_s=30.0)) as client:
            await asyncio.sleep(0.2)  # the worker's first look at the queue
            assert len(reads) == 1
            for body in ("hello", "and again"):
                await text(client, body)
                await providers.wait_for_async(lambda: providers.twilio_sent, timeout=5)
                await done(engine)
    finally:
        event.remove(Engine, "before_cursor_execute", listen)
    assert [s["Body"] for s in providers.twilio_sent] == ["echo: hello", "echo: and again"]
    assert len(reads) == 1, "a webhook's reply waited for a read of the whole queue"


async def test_a_retry_falls_due_on_time_while_other_texts_keep_waking_the_worker(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """Hints alone would never find a job that falls due by the clock: the worker still reads
    the whole queue once a poll interval, however busy."""
    providers.openai_plan(500)  # Alice's first model call fails: her job waits out a backoff
    settings = make_settings(worker_poll_s=0.3, reply_retry_base_s=0.2)
    async with running_app(settings) as client:
        started = time.monotonic()
        await text(client, "are you open today?", From=ALICE)
        alice_answered_at: float | None = None
        sender = 0
        while time.monotonic() - started < 3.0:  # others text every 20 ms meanwhile
            sender += 1
            await text(client, f"question {sender}", From=f"+1555100{sender:04d}")
            if alice_answered_at is None and any(s["To"] == ALICE for s in providers.twilio_sent):
                alice_answered_at = time.monotonic()
            await asyncio.sleep(0.02)
        await done(engine)
    assert providers.openai_attempts[0] == "500"
    assert alice_answered_at is not None, "Alice's retry waited for the other texts to stop"
    assert alice_answered_at - started < 1.5
    answered = [s["To"] for s in providers.twilio_sent]
    assert answered.count(ALICE) == 1
    assert len(answered) == sender + 1
