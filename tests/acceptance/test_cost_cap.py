"""`MODEL_CALLS_LIMIT` (SPEC §9): the whole deployment's model calls per window, counted in the
database. Past it every message is stored and marked `rate_limited` without a model call, one
warning is logged per window, and `parley_rate_limited_total{scope="global"}` counts them; two
app instances on one database share one count, even when they race for its last places.

Windows are fixed (from each full hour, or midnight UTC for `/day`): these tests use `N/day`,
so a window boundary cannot fall in the middle of one (a test takes seconds, not a day).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import utcnow
from service.models import Message, ModelCallWindow
from service.settings import SettingsError, load_settings
from service.store.budget import window_start
from tests.acceptance.test_metrics import delta, scrape
from tests.conftest import SettingsFactory, running_app
from tests.fakes import FakeProviders
from tests.helpers import eventually, messages, post_twilio, settled, twilio_form

FAST: dict[str, Any] = {"worker_poll_s": 0.05, "reply_retry_base_s": 0.05}
DAY = 86_400


def sender(n: int) -> str:
    return f"+1555020{n:04d}"


async def text_from(client: httpx.AsyncClient, n: int) -> None:
    response = await post_twilio(client, twilio_form(Body=f"question {n}", From=sender(n)))
    assert response.status_code == 200, response.text


async def statuses(engine: AsyncEngine) -> list[str]:
    return sorted(m.status for m in await messages(engine, Message.sender == "user"))


def cap_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "MODEL_CALLS_LIMIT" in r.getMessage()
    ]


async def test_past_the_limit_messages_are_stored_rate_limited_without_a_model_call(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    providers: FakeProviders,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_app(make_settings(model_calls_limit="3/day", **FAST)) as client:
        before = await scrape(client)
        await asyncio.gather(*(text_from(client, n) for n in range(5)))  # 5 people at once
        await eventually(lambda: settled(engine))
        for n in (5, 6):  # later ones too, once the window is known to be full
            await text_from(client, n)
            await eventually(lambda: settled(engine))
        after = await scrape(client)

    assert len(providers.openai_requests) == 3
    assert await statuses(engine) == ["answered"] * 3 + ["rate_limited"] * 4
    answered = {m.body for m in await messages(engine, Message.status == "answered")}
    assert sorted(s["Body"] for s in providers.twilio_sent) == sorted(
        f"echo: {body}" for body in answered
    )
    assert delta(before, after, "parley_rate_limited_total", scope="global") == 4
    assert delta(before, after, "parley_rate_limited_total", scope="conversation") == 0
    assert delta(before, after, "parley_replies_total", status="rate_limited") == 4
    [warning] = cap_warnings(caplog)
    assert warning.levelname == "WARNING" and warning.exc_info is None
    assert "3/day" in warning.getMessage()


async def test_two_app_instances_one_after_the_other_share_the_count(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    providers: FakeProviders,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(model_calls_limit="4/day", **FAST)
    async with running_app(settings) as first:
        for n in range(3):
            await text_from(first, n)
        await eventually(lambda: settled(engine))
    assert len(providers.openai_requests) == 3

    async with running_app(settings) as second:  # a new process: only the database remembers
        for n in range(3, 6):
            await text_from(second, n)
        await eventually(lambda: settled(engine))

    assert len(providers.openai_requests) == 4
    assert await statuses(engine) == ["answered"] * 4 + ["rate_limited"] * 2
    assert len(cap_warnings(caplog)) == 1


async def test_two_app_instances_racing_for_the_last_places_never_overshoot(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    providers: FakeProviders,
    caplog: pytest.LogCaptureFixture,
) -> None:
    providers.openai_delay = 0.2  # many calls in flight together, in both instances
    settings = make_settings(model_calls_limit="5/day", **FAST)
    async with running_app(settings) as one, running_app(settings) as two:
        before = await scrape(one)
        await asyncio.gather(*(text_from((one, two)[n % 2], n) for n in range(16)))
        await eventually(lambda: settled(engine), timeout=30)
        after = await scrape(one)  # both instances count in this test process's registry

    print(
        f"model calls: {len(providers.openai_requests)}, most at once: "
        f"{providers.openai_max_concurrency}"
    )
    assert len(providers.openai_requests) == 5
    assert await statuses(engine) == ["answered"] * 5 + ["rate_limited"] * 11
    assert delta(before, after, "parley_rate_limited_total", scope="global") == 11
    assert len(cap_warnings(caplog)) == 1  # one per window for the deployment, not per process


async def test_a_new_window_starts_afresh_and_old_windows_are_pruned(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    today = window_start(utcnow(), DAY)
    async with engine.begin() as connection:
        for days_ago in (1, 3):  # full windows of the past
            await connection.execute(
                insert(ModelCallWindow).values(
                    window_s=DAY,
                    window_start=today - dt.timedelta(days=days_ago),
                    calls=2,
                    created_at=utcnow(),
                )
            )
    async with running_app(make_settings(model_calls_limit="2/day", **FAST)) as client:
        await text_from(client, 1)
        await eventually(lambda: settled(engine))

    assert len(providers.openai_requests) == 1
    async with engine.connect() as connection:
        kept = (
            await connection.execute(
                select(ModelCallWindow.window_start, ModelCallWindow.calls).order_by(
                    ModelCallWindow.window_start
                )
            )
        ).all()
    assert [(start, calls) for start, calls in kept] == [
        (today - dt.timedelta(days=1), 2),
        (today, 1),
    ]


async def test_a_window_row_deleted_meanwhile_is_made_again_not_read_as_full(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """A process that has seen the window's row stops inserting it; an operator who deletes
    it (to reset the budget) gets a fresh count, not every call refused until midnight."""
    async with running_app(make_settings(model_calls_limit="2/day", **FAST)) as client:
        await text_from(client, 1)
        await eventually(lambda: settled(engine))
        async with engine.begin() as connection:
            await connection.execute(delete(ModelCallWindow))
        for n in (2, 3, 4):
            await text_from(client, n)
            await eventually(lambda: settled(engine))

    assert len(providers.openai_requests) == 3
    assert await statuses(engine) == ["answered"] * 3 + ["rate_limited"]
    async with engine.connect() as connection:
        calls = (await connection.execute(select(ModelCallWindow.calls))).scalars().all()
    assert calls == [2]


async def test_zero_means_unlimited_and_touches_no_ledger(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(make_settings(model_calls_limit="0", **FAST)) as client:
        await asyncio.gather(*(text_from(client, n) for n in range(4)))
        await eventually(lambda: settled(engine))

    assert len(providers.openai_requests) == 4
    async with engine.connect() as connection:
        assert (await connection.execute(select(ModelCallWindow))).all() == []


async def test_the_per_conversation_limit_is_counted_with_its_own_scope(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    settings = make_settings(reply_rate_limit="1/day", model_calls_limit="10/day", **FAST)
    async with running_app(settings) as client:
        before = await scrape(client)
        for _ in range(2):
            await text_from(client, 1)  # one person, twice
            await eventually(lambda: settled(engine))
        after = await scrape(client)

    assert len(providers.openai_requests) == 1
    assert delta(before, after, "parley_rate_limited_total", scope="conversation") == 1
    assert delta(before, after, "parley_rate_limited_total", scope="global") == 0
    assert delta(before, after, "parley_replies_total", status="rate_limited") == 1


def test_the_setting_defaults_to_10000_an_hour_and_refuses_nonsense() -> None:
    settings = load_settings(_env_file=None)
    assert settings.model_calls_limit == "10000/hour"
    cap = settings.model_calls_cap
    assert cap is not None and (cap.count, cap.window_s) == (10000, 3600)
    assert load_settings(model_calls_limit=" 0 ", _env_file=None).model_calls_cap is None
    for bad in ("abc", "-1/hour", "0/hour", "10/fortnight", ""):
        with pytest.raises(SettingsError, match="MODEL_CALLS_LIMIT"):
            load_settings(model_calls_limit=bad, _env_file=None)


def test_windows_start_at_whole_multiples_of_their_length() -> None:
    moment = dt.datetime(2026, 12, 1, 10, 37, 38, 659_000, tzinfo=dt.UTC)
    assert window_start(moment, 3600) == dt.datetime(2026, 12, 1, 10, tzinfo=dt.UTC)
    assert window_start(moment, DAY) == dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    assert window_start(moment, 60) == dt.datetime(2026, 12, 1, 10, 37, tzinfo=dt.UTC)


async def window_calls(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(select(ModelCallWindow.calls)) or 0)


async def test_places_are_taken_in_blocks_one_block_at_a_time_and_the_last_one_by_one(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """A large limit: a process takes a thousandth of it at once (here 4 places), and calls
    that need a place while a block is asked for wait for that block; the window's last
    places, fewer than a block, still go one at a time, and none past the limit."""
    providers.openai_delay = 0.1
    async with running_app(make_settings(model_calls_limit="4001/day", **FAST)) as client:
        await asyncio.gather(*(text_from(client, n) for n in range(6)))  # at once
        await eventually(lambda: settled(engine))
        assert len(providers.openai_requests) == 6
        assert await window_calls(engine) == 8  # two blocks, not one (or more) per call
        async with engine.begin() as connection:  # the deployment's other processes meanwhile
            await connection.execute(update(ModelCallWindow).values(calls=3998))
        for n in range(6, 12):
            await text_from(client, n)
            await eventually(lambda: settled(engine))
    # Two places left in this process's block (8 taken, 6 used), then 3999..4001 one by one.
    assert len(providers.openai_requests) == 6 + 2 + 3
    assert await window_calls(engine) == 4001
    assert await statuses(engine) == ["answered"] * 11 + ["rate_limited"]
