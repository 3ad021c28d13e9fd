"""One reply per burst (SPEC §12), as a texter and an operator see it: texts sent close together
get one model call and one reply; a text arriving while the model answers drops the unsent
answer (its call recorded `superseded`) and the model is asked again, at most twice; the wait
is capped; HELP and operator replies are not held back. In-process app, real SDKs, fake
providers on loopback; debounce times are fractions of a second."""

from __future__ import annotations

import asyncio
import time

import openai  # noqa: F401  # the app imports the SDK at its first model call, ~0.5 s: not here
from sqlalchemy.ext.asyncio import AsyncEngine

from service.conversation import HELP_TEXT
from tests.acceptance.test_pipeline import (
    bodies_sent,
    conversation_of,
    done,
    inbound,
    replies,
    text,
    user_turns,
)
from tests.conftest import SettingsFactory, running_app
from tests.fakes import FakeProviders
from tests.helpers import calls, jobs

ADMIN_TOKEN = "admin-burst-0123456789abcdef"
SLOW_POLL = {"worker_poll_s": 5.0}  # a reply on time proves the worker woke when it was due
FIVE = ["hi", "I ordered a cake", "for Saturday", "chocolate", "can I change it to lemon?"]


async def test_five_texts_within_200_ms_get_one_model_call_and_one_reply(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    settings = make_settings(reply_debounce_s=0.4, **SLOW_POLL)
    async with running_app(settings) as client:
        started = time.monotonic()
        await asyncio.gather(*(text(client, body) for body in FIVE))  # as a phone sends them
        last_text = time.monotonic()
        assert last_text - started < 0.4  # all within the quiet time (~50 ms when not loaded)
        await providers.wait_for_async(lambda: providers.twilio_sent, timeout=5)
        waited = time.monotonic() - last_text
        await done(engine)
    assert waited < 1.2, waited  # quiet for 0.4 s, not a 5 s poll
    questions = await inbound(engine)
    # Quiet for 0.4 s from when the last text was stored (its ack may reach the phone late on
    # a loaded machine: the quiet time is not counted from there).
    quiet = providers.twilio_sent[0]["time"] - max(m.created_at for m in questions).timestamp()
    assert 0.4 <= quiet < 1.2, quiet
    stored = [m.body for m in questions]
    assert sorted(stored) == sorted(FIVE)
    [request] = providers.openai_requests
    assert user_turns(request) == stored  # all five in the one prompt, in the order stored
    assert bodies_sent(providers) == [f"echo: {stored[-1]}"]
    assert [m.status for m in questions] == ["answered"] * 5
    [reply] = await replies(engine)
    assert reply.reply_to_id == questions[-1].id
    assert [c.status for c in await calls(engine)] == ["ok"]


async def test_a_text_during_a_slow_model_call_gets_one_reply_covering_both(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_delay = 0.4
    settings = make_settings(reply_debounce_s=0.2, admin_token=ADMIN_TOKEN, **SLOW_POLL)
    async with running_app(settings) as client:
        await text(client, "is the shop open")
        await providers.wait_for_async(lambda: providers.openai_requests, timeout=5)
        await text(client, "on Sunday?")  # while the model answers the first
        await done(engine)
        conversation = await conversation_of(engine)
        detail = await client.get(
            f"/api/conversations/{conversation.id}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
    first, second = providers.openai_requests
    assert user_turns(first) == ["is the shop open"]
    assert user_turns(second) == ["is the shop open", "on Sunday?"]
    assert bodies_sent(providers) == ["echo: on Sunday?"]  # one reply, to both
    [reply] = await replies(engine)
    dropped, answered = await calls(engine)
    assert (dropped.status, dropped.message_id) == ("superseded", None)
    assert (answered.status, answered.message_id) == ("ok", reply.id)
    assert [m.status for m in await inbound(engine)] == ["answered", "answered"]
    assert [j.status for j in await jobs(engine)] == ["done", "done"]
    shown = detail.json()["assistant_calls"]
    assert [c["status"] for c in shown] == ["superseded", "ok"]


async def test_at_the_rate_limit_an_interrupted_answer_goes_out_instead_of_a_retake(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_delay = 0.4
    settings = make_settings(reply_debounce_s=0.2, reply_rate_limit="1/hour", **SLOW_POLL)
    async with running_app(settings) as client:
        await text(client, "is the shop open")
        await providers.wait_for_async(lambda: providers.openai_requests, timeout=5)
        await text(client, "on Sunday?")  # a retake would pass REPLY_RATE_LIMIT
        await done(engine)
    assert len(providers.openai_requests) == 1
    assert bodies_sent(providers) == ["echo: is the shop open"]  # the answer is not lost
    assert [c.status for c in await calls(engine)] == ["ok"]
    assert [m.status for m in await inbound(engine)] == ["answered", "rate_limited"]


async def test_superseded_calls_count_for_the_rate_limit(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_delay = 0.4
    settings = make_settings(reply_debounce_s=0.2, reply_rate_limit="2/hour", **SLOW_POLL)
    async with running_app(settings) as client:
        await text(client, "is the shop open")
        await providers.wait_for_async(lambda: providers.openai_requests, timeout=5)
        await text(client, "on Sunday?")  # one retake: two calls, the limit
        await done(engine)
        await text(client, "and Monday?")
        await done(engine)
    assert [c.status for c in await calls(engine)] == ["superseded", "ok"]
    assert bodies_sent(providers) == ["echo: on Sunday?"]
    assert [m.status for m in await inbound(engine)] == ["answered", "answered", "rate_limited"]


async def test_the_model_is_asked_again_at_most_twice_then_the_reply_goes_out(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_delay = 0.3
    texts = ["one", "two", "three", "four"]
    async with running_app(make_settings(worker_poll_s=0.05)) as client:
        await text(client, texts[0])
        for asked, body in enumerate(texts[1:], start=1):
            await providers.wait_for_async(lambda n=asked: len(providers.openai_requests) >= n)
            await text(client, body)  # each arrives during a model call
        await done(engine)
    requests = providers.openai_requests
    assert [user_turns(r) for r in requests[:3]] == [
        ["one"],
        ["one", "two"],
        ["one", "two", "three"],
    ]
    # The reply to the first three was stored after "four" arrived: it is still its history.
    assert len(requests) == 4
    assert requests[3]["messages"][1:] == [
        *({"role": "user", "content": body} for body in texts[:3]),
        {"role": "assistant", "content": "echo: three"},
        {"role": "user", "content": "four"},
    ]
    assert [c.status for c in await calls(engine)] == ["superseded", "superseded", "ok", "ok"]
    # The third interruption sends anyway; "four" gets its own reply, after it.
    assert bodies_sent(providers) == ["echo: three", "echo: four"]


async def test_steady_texts_are_answered_by_the_cap_not_after_they_stop(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    settings = make_settings(reply_debounce_s=0.3, reply_debounce_max_s=0.8, **SLOW_POLL)
    asked_after = None
    async with running_app(settings) as client:
        started = time.monotonic()
        for n in range(15):  # a text every 0.1 s for 1.5 s: never 0.3 s of quiet
            await text(client, f"part {n}")
            if asked_after is None and providers.openai_requests:
                asked_after = time.monotonic() - started
            await asyncio.sleep(0.1)
        await done(engine)
    assert asked_after is not None and 0.7 <= asked_after < 1.2, asked_after
    first = user_turns(providers.openai_requests[0])
    assert 6 <= len(first) <= 11 and first == [f"part {n}" for n in range(len(first))]
    assert [m.status for m in await inbound(engine)] == ["answered"] * 15
    assert 2 <= len(providers.twilio_sent) <= 3


async def test_help_is_not_held_back_by_the_quiet_time(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """HELP ends the wait: the texts before it are answered with it, at once."""
    # A quiet time of 2 s: held back, the replies would take that long; at once, well under
    # it even on a loaded machine.
    async with running_app(make_settings(reply_debounce_s=2.0, **SLOW_POLL)) as client:
        started = time.monotonic()
        await text(client, "hello")
        await text(client, "HELP")
        await providers.wait_for_async(lambda: len(providers.twilio_sent) == 2, timeout=5)
        assert time.monotonic() - started < 1.5
        await done(engine)
    assert bodies_sent(providers) == ["echo: hello", HELP_TEXT]


async def test_an_operator_reply_is_not_held_back_by_the_quiet_time(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    settings = make_settings(reply_debounce_s=2.0, admin_token=ADMIN_TOKEN, **SLOW_POLL)
    async with running_app(settings) as client:
        await text(client, "anyone there?")
        conversation = await conversation_of(engine)
        started = time.monotonic()
        response = await client.post(
            f"/api/conversations/{conversation.id}/messages",
            json={"body": "Sam here, one moment."},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert response.status_code == 202
        await providers.wait_for_async(lambda: len(providers.twilio_sent) == 2, timeout=5)
        assert time.monotonic() - started < 1.5
        await done(engine)
    assert bodies_sent(providers) == ["Sam here, one moment.", "echo: anyone there?"]
