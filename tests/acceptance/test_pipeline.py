"""The reply pipeline as a texter and an operator see it: what was stored, what went out, to
whom, in which order, how many times — with model and Twilio failures, bursts, rate limits,
opt-out keywords and delivery callbacks. In-process app, real SDKs, fake providers on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.conversation import HELP_TEXT
from service.models import Conversation, Message
from service.settings import Settings
from tests.conftest import SettingsFactory, running_app
from tests.fakes import FakeProviders
from tests.helpers import (
    calls,
    conversations,
    eventually,
    jobs,
    messages,
    post_twilio,
    replay,
    settled,
    twilio_form,
)
from tests.processes import free_port
from tests.raw_http import model_server

TEXTER = "+15550001111"
OUR_NUMBER = "+15559990000"
OPT_OUT_WORDS = ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"]

# Tuning knobs beyond the spec's table; a retry or a poll should not cost a test a second.
FAST: dict[str, Any] = {"worker_poll_s": 0.05, "reply_retry_base_s": 0.05}


def fast(make_settings: SettingsFactory, **overrides: Any) -> Settings:
    return make_settings(**{**FAST, **overrides})


async def text(client: httpx.AsyncClient, body: str, **fields: str | None) -> None:
    """The texter sends one SMS (a fresh MessageSid); Twilio gets its 200."""
    response = await post_twilio(client, twilio_form(Body=body, **fields))
    assert response.status_code == 200, response.text


async def done(engine: AsyncEngine, timeout: float = 10.0) -> None:
    await eventually(lambda: settled(engine), timeout=timeout)


def bodies_sent(providers: FakeProviders) -> list[str]:
    return [s["Body"] for s in providers.twilio_sent]


def user_turns(request: dict[str, Any]) -> list[str]:
    return [m["content"] for m in request["messages"] if m["role"] == "user"]


async def inbound(engine: AsyncEngine, *where: Any) -> list[Any]:
    return await messages(engine, Message.sender == "user", *where)


async def replies(engine: AsyncEngine, *where: Any) -> list[Any]:
    return await messages(engine, Message.sender == "assistant", *where)


async def conversation_of(engine: AsyncEngine, remote: str = TEXTER) -> Any:
    [conversation] = await conversations(engine, Conversation.remote_address == remote)
    return conversation


# ------------------------------------------------------------------ model failures


async def test_model_500_once_then_success_sends_exactly_one_reply(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_plan(500)
    async with running_app(fast(make_settings)) as client:
        await text(client, "Hello there")
        await done(engine)

    assert providers.openai_attempts == ["500", "ok"]
    assert bodies_sent(providers) == ["echo: Hello there"]
    [sent] = providers.twilio_sent
    assert (sent["To"], sent["From"]) == (TEXTER, OUR_NUMBER)
    [message] = await inbound(engine)
    assert message.status == "answered"
    [reply] = await replies(engine)
    assert reply.provider_message_id == sent["sid"]
    error, ok = await calls(engine)
    assert error.status == "error" and "500" in error.error and error.message_id is None
    assert ok.status == "ok" and ok.error is None and ok.message_id == reply.id


async def test_model_500_on_every_try_marks_the_message_failed_after_max_attempts(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_plan(500, 500, 500, 500, 500)
    async with running_app(fast(make_settings, reply_max_attempts=3)) as client:
        await text(client, "Hello there")
        await done(engine)
        await asyncio.sleep(0.3)  # a fourth try would come within a few polls

    assert providers.openai_attempts == ["500", "500", "500"]
    assert providers.twilio_attempts == []
    [message] = await inbound(engine)
    assert message.status == "failed" and "500" in (message.error or "")
    assert await replies(engine) == []
    [job] = await jobs(engine)
    assert (job.status, job.attempts) == ("failed", 3)
    assert "500" in (job.last_error or "")
    assert [c.status for c in await calls(engine)] == ["error"] * 3


async def test_a_failing_conversation_never_blocks_another(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """One conversation's model calls fail every time while another's succeed."""

    def reply(request: dict[str, Any]) -> str:
        if user_turns(request)[-1] == "doomed":
            raise RuntimeError("model is down for this one")
        return "echo: " + user_turns(request)[-1]

    providers.openai_reply = reply
    settings = fast(make_settings, reply_max_attempts=3, reply_retry_base_s=0.5)
    async with running_app(settings) as client:
        await text(client, "doomed")
        await providers.wait_for_async(lambda: providers.openai_requests)
        await text(client, "fine", From="+15550002222")
        await providers.wait_for_async(lambda: providers.twilio_sent)
        doomed_job = (await jobs(engine))[0]
        assert doomed_job.status in ("queued", "running")  # still retrying, not blocking
        await done(engine)

    assert [(s["To"], s["Body"]) for s in providers.twilio_sent] == [("+15550002222", "echo: fine")]
    assert [user_turns(r)[-1] for r in providers.openai_requests].count("doomed") == 3
    [doomed] = await inbound(engine, Message.body == "doomed")
    [fine] = await inbound(engine, Message.body == "fine")
    assert doomed.status == "failed" and "500" in (doomed.error or "")
    assert fine.status == "answered"


async def test_model_refusal_is_not_retried(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_plan(("error", 400, 400, "This model's maximum context length is 8192"))
    async with running_app(fast(make_settings)) as client:
        await text(client, "Hello there")
        await done(engine)

    assert providers.openai_attempts == ["error:400"]
    assert providers.twilio_attempts == []
    [message] = await inbound(engine)
    assert message.status == "failed" and "400" in (message.error or "")
    [job] = await jobs(engine)
    assert (job.status, job.attempts) == ("failed", 1)


async def test_model_timeout_is_retried(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_plan(("hang", 5))
    async with running_app(fast(make_settings, assistant_timeout_s=0.5)) as client:
        await text(client, "Hello there")
        await done(engine)

    assert providers.openai_attempts == ["hang", "ok"]
    assert bodies_sent(providers) == ["echo: Hello there"]
    failed, ok = await calls(engine)
    assert [failed.status, ok.status] == ["error", "ok"]
    assert failed.error == "model call timed out"
    assert failed.processing_time >= 400  # the time spent waiting counts, not 0 ms


@pytest.mark.parametrize(
    ("answer", "recorded"),
    [(None, "model unreachable: "), (b"GARBAGE\r\n\r\n", "model unreachable: bad HTTP answer")],
    ids=["connection refused", "not HTTP"],
)
async def test_an_unreachable_or_garbled_model_is_retried_and_recorded_as_unreachable(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    providers: FakeProviders,
    answer: bytes | None,
    recorded: str,
) -> None:
    """A refused connection is not a timeout, and a server that does not speak HTTP (a proxy or
    port mix-up) is no crash: the operator reading the error is told the model server is
    unreachable, and each try is a recorded failed call before the message fails (the SDK's
    aiohttp transport calls the first a connect timeout and lets the second escape raw)."""
    async with contextlib.AsyncExitStack() as stack:
        if answer is None:
            base_url = f"http://127.0.0.1:{free_port()}/v1"
        else:
            base_url = await stack.enter_async_context(model_server(answer))
        settings = fast(make_settings, openai_base_url=base_url, reply_max_attempts=2)
        async with running_app(settings) as client:
            await text(client, "Hello there")
            await done(engine)

    assert providers.twilio_attempts == []
    [message] = await inbound(engine)
    assert message.status == "failed"
    assert (message.error or "").startswith(recorded)
    assert [call.status for call in await calls(engine)] == ["error", "error"]


async def test_a_lease_is_renewed_while_a_slow_model_answers(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """A model call longer than the lease: the job is not taken over, so nothing is doubled."""
    providers.openai_delay = 2.0  # the heartbeat must renew the 1 s lease at least once
    async with running_app(fast(make_settings, reply_lease_s=1.0)) as client:
        await text(client, "Hello there")
        await done(engine)

    assert len(providers.openai_requests) == 1
    assert bodies_sent(providers) == ["echo: Hello there"]
    [job] = await jobs(engine)
    assert (job.status, job.attempts) == ("done", 1)


# ------------------------------------------------------------------ Twilio failures


async def test_twilio_500_once_sends_once_and_asks_the_model_once(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.twilio_plan(500)
    async with running_app(fast(make_settings)) as client:
        await text(client, "Hello there")
        await done(engine)

    assert providers.twilio_attempts == ["500", "ok"]
    assert bodies_sent(providers) == ["echo: Hello there"]
    assert len(providers.openai_requests) == 1
    assert [c.status for c in await calls(engine)] == ["ok"]
    [reply] = await replies(engine)
    assert reply.status == "queued" and reply.provider_message_id == providers.twilio_sent[0]["sid"]


async def test_twilio_500_on_every_try_marks_the_reply_failed_without_asking_the_model_again(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.twilio_plan(500, 500, 500, 500)
    async with running_app(fast(make_settings, reply_max_attempts=3)) as client:
        await text(client, "Hello there")
        await done(engine)

    assert providers.twilio_attempts == ["500", "500", "500"]
    assert providers.twilio_sent == []
    assert len(providers.openai_requests) == 1
    [reply] = await replies(engine)
    assert reply.status == "failed" and "500" in (reply.error or "")
    [job] = await jobs(engine)
    assert job.status == "failed" and "500" in (job.last_error or "")


async def test_twilio_429_waits_at_least_retry_after(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    retry_after = 1.0  # the backoff alone would retry after ~0.05 s
    providers.twilio_plan((429, retry_after))
    async with running_app(fast(make_settings)) as client:
        await text(client, "Hello there")
        await providers.wait_for_async(lambda: providers.twilio_attempts, interval=0.002)
        refused_by = time.time()  # the 429 was answered at or before this moment
        await done(engine)

    assert providers.twilio_attempts == ["429", "ok"]
    [sent] = providers.twilio_sent
    assert sent["time"] - refused_by >= retry_after - 0.01
    [job] = await jobs(engine)
    assert "429" in (job.last_error or "")
    assert job.run_after.timestamp() - refused_by >= retry_after - 0.05
    assert sent["time"] >= job.run_after.timestamp()
    assert len(providers.openai_requests) == 1


async def test_timeout_after_twilio_accepted_sends_no_second_sms(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.twilio_plan(("accept_then_hang", 5))
    async with running_app(fast(make_settings, provider_timeout_s=0.5)) as client:
        await text(client, "Hello there")
        await done(engine)

    assert providers.twilio_attempts == ["accept_then_hang"]
    [sent] = providers.twilio_sent
    [reply] = await replies(engine)
    assert reply.provider_message_id == sent["sid"]
    assert reply.status == "queued"
    assert len(providers.openai_requests) == 1


async def test_timeout_before_twilio_accepted_sends_exactly_once(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.twilio_plan(("hang", 5))
    async with running_app(fast(make_settings, provider_timeout_s=0.5)) as client:
        await text(client, "Hello there")
        await done(engine)

    assert providers.twilio_attempts == ["hang", "ok"]
    assert bodies_sent(providers) == ["echo: Hello there"]
    [reply] = await replies(engine)
    assert reply.provider_message_id == providers.twilio_sent[0]["sid"]
    assert len(providers.openai_requests) == 1


async def test_identical_reply_after_a_hung_send_is_still_sent(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(fast(make_settings, provider_timeout_s=0.5)) as client:
        await text(client, "ok")
        await done(engine)
        providers.twilio_plan(("hang", 5))  # this send never reaches Twilio
        await text(client, "ok")
        await done(engine)

    assert bodies_sent(providers) == ["echo: ok", "echo: ok"]
    first, second = await replies(engine)
    assert first.provider_message_id != second.provider_message_id


async def test_twilio_21610_opts_the_conversation_out_without_retrying(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.twilio_plan(("error", 400, 21610, "Attempt to send to unsubscribed recipient"))
    async with running_app(fast(make_settings)) as client:
        await text(client, "Hello there")
        await done(engine)
        await asyncio.sleep(0.3)  # a retry would come within a few polls
        assert providers.twilio_attempts == ["error:21610"]
        assert (await conversation_of(engine)).opted_out is True
        [reply] = await replies(engine)
        assert reply.status == "failed" and "21610" in (reply.error or "")

        await text(client, "Hello? Anyone?")
        await done(engine)

    assert providers.twilio_attempts == ["error:21610"]
    assert providers.twilio_sent == []
    assert len(providers.openai_requests) == 1
    [later] = await inbound(engine, Message.body == "Hello? Anyone?")
    assert later.status == "not_answered"
    assert len(await replies(engine)) == 1


async def test_twilio_21211_marks_the_reply_failed_without_retrying(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.twilio_plan(("error", 400, 21211, "Invalid 'To' Phone Number: +15550001111"))
    async with running_app(fast(make_settings)) as client:
        await text(client, "Hello there")
        await done(engine)
        await asyncio.sleep(0.3)

    assert providers.twilio_attempts == ["error:21211"]
    assert providers.twilio_sent == []
    assert len(providers.openai_requests) == 1
    [reply] = await replies(engine)
    assert reply.status == "failed" and "21211" in (reply.error or "")
    [job] = await jobs(engine)
    assert job.status == "failed" and "21211" in (job.last_error or "")
    assert (await conversation_of(engine)).opted_out is False


# ------------------------------------------------------------------ bursts and order


BURST = ["one", "two", "three", "four", "five"]


async def burst(client: httpx.AsyncClient, providers: FakeProviders) -> float:
    """Five texts 40 ms apart while the model takes a second; returns how long sending took."""
    providers.openai_delay = 1.0
    started = time.monotonic()
    for i, body in enumerate(BURST):
        if i:
            await asyncio.sleep(0.04)
        await text(client, body)
    return time.monotonic() - started


async def test_a_burst_during_the_model_call_is_answered_once_together_in_order(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """SPEC §12: the answer to "one" is dropped unsent when the rest arrive during its model
    call, and the model is asked again with all five (the debounce is off here)."""
    async with running_app(fast(make_settings)) as client:
        elapsed = await burst(client, providers)
        await done(engine)

    assert elapsed < providers.openai_delay  # all of them arrived while "one" was answered
    first, second = providers.openai_requests
    assert first["messages"][1:] == [{"role": "user", "content": "one"}]
    assert second["messages"][1:] == [{"role": "user", "content": b} for b in BURST]
    assert [(s["To"], s["From"], s["Body"]) for s in providers.twilio_sent] == [
        (TEXTER, OUR_NUMBER, "echo: five"),
    ]
    received = await inbound(engine)
    assert [m.body for m in received] == BURST
    assert {m.status for m in received} == {"answered"}
    [reply] = await replies(engine)
    assert reply.reply_to_id == received[-1].id
    assert [c.status for c in await calls(engine)] == ["superseded", "ok"]


async def test_rate_limit_marks_the_message_and_skips_the_model_with_one_warning(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    providers: FakeProviders,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with running_app(fast(make_settings, reply_rate_limit="2/hour")) as client:
        for body in ["one", "two", "three", "four"]:
            await text(client, body)
            await done(engine)

    assert [user_turns(r)[-1] for r in providers.openai_requests] == ["one", "two"]
    assert bodies_sent(providers) == ["echo: one", "echo: two"]
    assert [m.status for m in await inbound(engine)] == [
        "answered",
        "answered",
        "rate_limited",
        "rate_limited",
    ]
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "RATE_LIMIT" in r.getMessage()
    ]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


# ------------------------------------------------------------------ opt-out and HELP


async def test_stop_silences_start_resumes_and_keywords_never_reach_the_model(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(fast(make_settings)) as client:
        assert (await replay(client, "twilio/sms_stop.json")).status_code == 200
        await done(engine)
        assert (await conversation_of(engine)).opted_out is True

        await text(client, "Are you still there?")
        await done(engine)
        await asyncio.sleep(0.2)
        assert providers.openai_requests == [] and providers.twilio_attempts == []

        assert (await replay(client, "twilio/sms_start.json")).status_code == 200
        await done(engine)
        assert (await conversation_of(engine)).opted_out is False

        await text(client, "Back again")
        await done(engine)

    assert bodies_sent(providers) == ["echo: Back again"]  # nothing for STOP, while out, START
    assert [m.status for m in await inbound(engine)] == [
        "not_answered",  # Stop
        "not_answered",  # sent while opted out
        "not_answered",  # START
        "answered",
    ]
    [request] = providers.openai_requests
    contents = [m["content"] for m in request["messages"][1:]]
    assert contents[-1] == "Back again"
    assert not {"Stop", "START"} & set(contents)


@pytest.mark.parametrize(
    ("fixture", "body"), [("twilio/sms_help.json", None), ("twilio/sms_hello.json", "  info. ")]
)
async def test_help_and_info_get_the_fixed_text_without_the_model(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    providers: FakeProviders,
    fixture: str,
    body: str | None,
) -> None:
    async with running_app(fast(make_settings)) as client:
        if body is None:
            assert (await replay(client, fixture)).status_code == 200
        else:
            await text(client, body)
        await done(engine)

    assert providers.openai_attempts == []
    [sent] = providers.twilio_sent
    assert (sent["To"], sent["From"], sent["Body"]) == (TEXTER, OUR_NUMBER, HELP_TEXT)
    [reply] = await replies(engine)
    assert (reply.author, reply.body, reply.provider_message_id) == (
        "fixed",
        HELP_TEXT,
        sent["sid"],
    )
    [message] = await inbound(engine)
    assert message.status == "answered"
    assert await calls(engine) == []


def _odd_case(word: str) -> str:
    return "".join(c.lower() if i % 2 else c.upper() for i, c in enumerate(word))


ODD_KEYWORDS = [
    f" \t{_odd_case('STOP')}.\n",
    f"!!{_odd_case('STOPALL')}!!",
    f"  {_odd_case('UNSUBSCRIBE')}?  ",
    f"({_odd_case('CANCEL')})",
    f"*{_odd_case('END')}*",
    f"{_odd_case('QUIT')}...",
    f'"{_odd_case("REVOKE")}"',
    f" -{_odd_case('OPTOUT')}- ",
]


async def test_every_opt_out_keyword_in_any_case_and_punctuation_opts_out(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    assert [w.strip(' \t\n!?.()*"-').upper() for w in ODD_KEYWORDS] == OPT_OUT_WORDS
    senders = {body: f"+1555000{3000 + i}" for i, body in enumerate(ODD_KEYWORDS)}
    async with running_app(fast(make_settings)) as client:
        for body, sender in senders.items():
            await text(client, body, From=sender)
        await text(client, "stop please", From="+15550004000")
        await text(client, "Please remove me", From="+15550004001", OptOutType="STOP")
        await done(engine)
        for sender in [*senders.values(), "+15550004001"]:
            await text(client, "one more thing", From=sender)
        await done(engine)

    for sender in [*senders.values(), "+15550004001"]:
        conversation = await conversation_of(engine, sender)
        assert conversation.opted_out is True, sender
    assert (await conversation_of(engine, "+15550004000")).opted_out is False
    assert [(s["To"], s["Body"]) for s in providers.twilio_sent] == [
        ("+15550004000", "echo: stop please")
    ]
    assert [user_turns(r)[-1] for r in providers.openai_requests] == ["stop please"]


async def test_stop_while_a_reply_is_being_written_silences_it(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_delay = 1.0
    async with running_app(fast(make_settings)) as client:
        await text(client, "What's the weather tomorrow?")
        await providers.wait_for_async(lambda: providers.openai_requests)
        assert (await replay(client, "twilio/sms_stop.json")).status_code == 200
        await done(engine)

    assert (await conversation_of(engine)).opted_out is True
    assert providers.twilio_sent == []


# ------------------------------------------------------------------ status callbacks


async def post_status(
    client: httpx.AsyncClient, fixture: str, sid: str, **kwargs: Any
) -> httpx.Response:
    form = twilio_form(f"twilio/{fixture}.json", MessageSid=sid, SmsSid=sid)
    return await post_twilio(client, form, path="/webhooks/twilio/status", **kwargs)


async def test_status_callbacks_move_delivery_forward_only(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(fast(make_settings)) as client:
        await text(client, "first")
        await done(engine)
        await text(client, "second")  # after the first reply, so not coalesced with it
        await done(engine)
        first, second = await replies(engine)
        assert (first.status, second.status) == ("queued", "queued")

        delivered = await post_status(client, "status_delivered", first.provider_message_id)
        late_sent = await post_status(client, "status_sent", first.provider_message_id)
        undelivered = await post_status(client, "status_undelivered", second.provider_message_id)

    assert (delivered.status_code, late_sent.status_code, undelivered.status_code) == (
        204,
        204,
        204,
    )
    first, second = await replies(engine)
    assert (first.status, first.error) == ("delivered", None)
    assert second.status == "undelivered" and "30003" in (second.error or "")


async def test_status_callback_for_an_unknown_sid_or_badly_signed_changes_nothing(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(fast(make_settings)) as client:
        await text(client, "first")
        await done(engine)
        before = await messages(engine)
        [reply] = await replies(engine)

        unknown = await post_status(client, "status_delivered", "SM" + "0" * 32)
        forged = await post_status(
            client, "status_delivered", reply.provider_message_id, token="not-our-token"
        )
        unsigned = await post_status(
            client, "status_delivered", reply.provider_message_id, signature=""
        )
        recorded = await replay(client, "twilio/status_delivered.json")  # its own sid: unknown

    assert unknown.status_code == 204 and recorded.status_code == 204
    assert (forged.status_code, unsigned.status_code) == (403, 403)
    assert await messages(engine) == before


async def test_status_callback_that_arrives_before_the_send_is_recorded_is_kept(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.twilio_plan(("accept_then_hang", 1.0))  # accepted; its answer comes 1 s later
    async with running_app(fast(make_settings, provider_timeout_s=5.0)) as client:
        await text(client, "Hello there")
        [sent] = await providers.wait_for_async(lambda: providers.twilio_sent)
        response = await post_status(client, "status_delivered", sent["sid"])
        await done(engine)

    assert response.status_code == 204
    [reply] = await replies(engine)
    assert reply.provider_message_id == sent["sid"]
    assert reply.status == "delivered"


async def test_pausing_while_a_reply_waits_to_be_resent_leaves_no_message_waiting(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """A reply whose send failed waits out its retry; a new text arrives and the operator
    pauses: the withheld reply fails visibly and the new text is marked not answered, not left
    waiting forever with its job done."""
    providers.twilio_plan(500)
    settings = make_settings(admin_token="op-token", worker_poll_s=0.05, reply_retry_base_s=1.0)
    async with running_app(settings) as client:
        await text(client, "first")
        await eventually(lambda: asyncio.sleep(0, providers.twilio_attempts == ["500"]))
        await text(client, "second")
        [conversation] = await conversations(engine)
        paused = await client.post(
            f"/api/conversations/{conversation.id}/pause",
            headers={"Authorization": "Bearer op-token"},
        )
        assert paused.status_code == 204
        await done(engine)

    assert providers.twilio_sent == []
    first, second = await inbound(engine)
    assert (first.status, second.status) == ("answered", "not_answered")
    [reply] = await replies(engine)
    assert reply.status == "failed" and "paused" in reply.error


async def test_a_text_that_joins_a_failing_conversation_keeps_its_own_tries(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """The model is down. "second" arrives while "first" waits out its retry: "first" fails
    after its 3 tries, and "second" gets 3 tries of its own, not the last one of "first"."""
    providers.openai_plan(*([500] * 10))
    settings = make_settings(reply_max_attempts=3, worker_poll_s=0.05, reply_retry_base_s=0.3)
    async with running_app(settings) as client:
        await text(client, "first")
        await eventually(lambda: asyncio.sleep(0, len(providers.openai_attempts) == 1))
        await text(client, "second")
        await done(engine, timeout=20)

    first, second = await inbound(engine)
    assert (first.status, second.status) == ("failed", "failed")
    assert [j.attempts for j in await jobs(engine)] == [3, 3]
    assert len(providers.openai_attempts) == 4  # calls 2 to 4 carried "second": its own 3
