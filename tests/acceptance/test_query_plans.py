"""The statements a reply runs on SQLite use the indexes meant for them.

SQLite plans a statement when it prepares it, from the schema alone until `ANALYZE` has run
(Parley never runs it): given `conversation_id = ? AND status = ?`, it may pick the index on
`status`, which is one value for every message still waiting. Under a backlog such a
statement reads every waiting message of every conversation, and it runs on the event loop's
thread (`sqlite_dialect`'s inline transactions). This test records every statement of a
webhook, its reply and a delivery callback, and asks SQLite how it would run each one."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import SettingsFactory, running_app
from tests.fakes import FakeProviders
from tests.helpers import eventually, post_twilio, settled, twilio_form

# Tables whose rows grow with traffic: never read whole.
GROWING = ("message", "reply_job", "conversation", "assistant_call", "delivery_report")
# Lookups by a status: every waiting row of every conversation.
BY_STATUS = ("(status=?",)


def _plans(path: str, statements: list[tuple[str, Any]]) -> dict[str, list[str]]:
    """Each distinct statement's query plan, as SQLite would run it now."""
    database = sqlite3.connect(path)
    try:
        plans: dict[str, list[str]] = {}
        for statement, parameters in statements:
            if statement in plans or not statement.lstrip().upper().startswith(
                ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH")
            ):
                continue
            if isinstance(parameters, list):  # executemany: the first row's
                parameters = parameters[0] if parameters else ()
            rows = database.execute(f"EXPLAIN QUERY PLAN {statement}", parameters).fetchall()
            plans[statement] = [row[-1] for row in rows]
        return plans
    finally:
        database.close()


def _wrong(statement: str, plan: list[str]) -> list[str]:
    """The steps that read a growing table whole, or, in a statement narrowed to some
    conversations, find rows by a status index instead of the conversations' index.

    Statements that are about the whole queue (a claim) may go by status: they are not run
    in inline transactions."""
    by_conversation = "conversation_id = ?" in statement or "conversation_id IN (" in statement
    # A conversation's queued jobs by its index alone: every job it ever had (done ones stay).
    every_job = "reply_job.status" in statement and "reply_job.conversation_id IN (" in statement
    return [
        step
        for step in plan
        if any(step.startswith(f"SCAN {table}") for table in GROWING)
        or (by_conversation and any(marker in step for marker in BY_STATUS))
        or (every_job and "ix_reply_job_conversation_id " in step)
    ]


async def _reply_traffic(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """A texter writing twice, answered each time; then four texters writing twice each at
    once, debounced (SPEC §12): batches of webhooks for several conversations, each with an
    earlier job waiting."""
    async with running_app(make_settings(worker_poll_s=0.05)) as client:
        for body in ("hello", "and again"):
            response = await post_twilio(client, twilio_form(Body=body))
            assert response.status_code == 200
            await eventually(lambda: settled(engine), timeout=10)
    texters = [f"+1555000{n:04d}" for n in range(4)]
    async with running_app(make_settings(worker_poll_s=0.05, reply_debounce_s=0.5)) as client:
        for body in ("one", "two"):
            posted = await asyncio.gather(
                *(post_twilio(client, twilio_form(Body=body, From=who)) for who in texters)
            )
            assert [response.status_code for response in posted] == [200] * 4
        await eventually(lambda: settled(engine), timeout=10)
    assert len(providers.twilio_sent) == 2 + len(texters)  # each burst one reply


async def test_a_replys_statements_use_their_indexes(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders, database_url: str
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite's planner without statistics; PostgreSQL keeps its own")
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        await _reply_traffic(make_settings, engine, providers)
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    plans = _plans(database_url.split("///", 1)[1], seen)
    assert len(plans) >= 20  # the webhooks', the claims' and the replies' statements
    wrong = {
        statement: bad for statement, plan in plans.items() if (bad := _wrong(statement, plan))
    }
    assert not wrong, wrong
    # The reply's state read: when the person last wrote and the recent calls, each a seek or
    # a range, not every message or call of the conversation.
    [state_read] = [plan for statement, plan in plans.items() if "last_inbound_at" in statement]
    steps = " ".join(state_read)
    assert "ix_message_conversation_sender_time" in steps, state_read
    assert "ix_assistant_call_conversation_time (conversation_id=? AND created_at>?)" in steps
