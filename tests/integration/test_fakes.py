"""Drive tests/fakes.py through the real twilio, sendgrid and openai SDKs.

Why: the fakes are only worth having if the genuine SDKs accept their
answers and raise their genuine exceptions; these tests pin that down and
document how each SDK must be configured to reach the fakes.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import aiohttp
import openai
import pytest
from python_http_client import exceptions as sg_errors
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Mail
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from tests.fakes import FakeProviders

ACCOUNT_SID = "AC" + "0" * 32
AUTH_TOKEN = "test-token"
TEXTER = "+15550001111"
OUR_NUMBER = "+15550002222"


@pytest.fixture(scope="module")
def fakes_server() -> Iterator[FakeProviders]:
    """This module's own server (independent of conftest's): stopping takes ~0.2 s."""
    with FakeProviders() as server:
        yield server


@pytest.fixture
def fakes(fakes_server: FakeProviders) -> FakeProviders:
    """A clean fake per test."""
    fakes_server.reset()
    return fakes_server


@asynccontextmanager
async def twilio_client(fakes: FakeProviders) -> AsyncIterator[Client]:
    """A real async twilio Client aimed at the fake (aiohttp session closed after)."""
    http_client = AsyncTwilioHttpClient()
    client = Client(ACCOUNT_SID, AUTH_TOKEN, http_client=http_client)
    client.edge = client.region = None  # TWILIO_EDGE/REGION would rewrite the host
    client.api.base_url = fakes.base_url
    try:
        yield client
    finally:
        await http_client.close()


async def send_sms(client: Client, body: str = "hello") -> str:
    """Send one SMS through the SDK the way the service will; return its sid."""
    message = await client.messages.create_async(
        to=TEXTER,
        from_=OUR_NUMBER,
        body=body,
        status_callback="http://parley.test/webhooks/twilio/status",
    )
    return str(message.sid)


def sendgrid_client(fakes: FakeProviders, timeout: float = 5.0) -> SendGridAPIClient:
    """A real SendGrid client aimed at the fake, with a timeout it lacks by default."""
    client = SendGridAPIClient("SG.test-key", host=fakes.base_url)
    client.client.timeout = timeout
    return client


def a_mail() -> Mail:
    """A minimal valid mail built with the SDK's helper."""
    return Mail("bot@parley.test", "alice@example.com", "Re: hi", plain_text_content="hello")


def openai_client(fakes: FakeProviders, timeout: float = 5.0) -> openai.AsyncOpenAI:
    """A real AsyncOpenAI aimed at the fake, without SDK-level retries."""
    return openai.AsyncOpenAI(
        api_key="test", base_url=fakes.base_url + "/v1", max_retries=0, timeout=timeout
    )


async def ask(client: openai.AsyncOpenAI, text: str = "hi") -> str:
    """One chat completion; returns the assistant text."""
    completion = await client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": text}]
    )
    return completion.choices[0].message.content or ""


# -- lifecycle ----------------------------------------------------------------


def test_base_url_is_loopback_and_stop_is_prompt() -> None:
    with FakeProviders() as fakes:
        assert fakes.base_url == f"http://127.0.0.1:{fakes.port}"
        socket.create_connection(("127.0.0.1", fakes.port), timeout=1).close()
        started = time.monotonic()
    assert time.monotonic() - started < 2
    with pytest.raises(RuntimeError):
        _ = fakes.base_url


@pytest.mark.asyncio
async def test_async_with_and_stop_answers_a_hung_request_at_once() -> None:
    async with FakeProviders() as own:
        own.openai_plan(("hang", 30))
        client = openai_client(own, timeout=30)
        pending = asyncio.create_task(ask(client))
        await own.wait_for_async(lambda: own.openai_attempts == ["hang"], timeout=5)
    with pytest.raises(openai.APIStatusError) as late:
        await asyncio.wait_for(pending, timeout=2)
    await client.close()
    assert late.value.status_code == 504


def test_bad_plan_action_fails_in_the_test_thread(fakes: FakeProviders) -> None:
    with pytest.raises(ValueError):
        fakes.twilio_plan(("hang",))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        fakes.openai_plan(200)


# -- twilio -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_twilio_send_is_recorded_and_parsed_by_sdk(fakes: FakeProviders) -> None:
    async with twilio_client(fakes) as client:
        message = await client.messages.create_async(to=TEXTER, from_=OUR_NUMBER, body="hi there")
    assert message.sid.startswith("SM") and len(message.sid) == 34
    assert (message.status, message.to, message.from_, message.body) == (
        "queued",
        TEXTER,
        OUR_NUMBER,
        "hi there",
    )
    assert message.date_created is not None and message.date_sent is None
    [sent] = fakes.twilio_sent
    assert (sent["To"], sent["From"], sent["Body"], sent["sid"]) == (
        TEXTER,
        OUR_NUMBER,
        "hi there",
        message.sid,
    )
    assert sent["auth"] == (ACCOUNT_SID, AUTH_TOKEN)


@pytest.mark.asyncio
async def test_twilio_429_500_and_refusal_raise_and_record_nothing(fakes: FakeProviders) -> None:
    fakes.twilio_plan(
        (429, 2), 500, ("error", 400, 21610, "Attempt to send to unsubscribed recipient")
    )
    async with twilio_client(fakes) as client:
        errors = []
        for _ in range(3):
            with pytest.raises(TwilioRestException) as caught:
                await send_sms(client)
            errors.append((caught.value.status, caught.value.code))
        assert await send_sms(client)
    assert errors == [(429, 20429), (500, 20500), (400, 21610)]
    assert fakes.twilio_attempts == ["429", "500", "error:21610", "ok"]
    [sent] = fakes.twilio_sent
    assert sent["StatusCallback"] == "http://parley.test/webhooks/twilio/status"


@pytest.mark.asyncio
async def test_twilio_validates_like_the_real_api(fakes: FakeProviders) -> None:
    async with twilio_client(fakes) as client:
        with pytest.raises(TwilioRestException) as too_long:
            await send_sms(client, body="x" * 1601)
        with pytest.raises(TwilioRestException) as bad_to:
            await client.messages.create_async(to="5550001111", from_=OUR_NUMBER, body="hi")
    assert (too_long.value.code, bad_to.value.code) == (21617, 21211)
    assert fakes.twilio_sent == []


@pytest.mark.asyncio
async def test_twilio_takes_whatsapp_sends_and_templates_and_answers_63016_when_told(
    fakes: FakeProviders,
) -> None:
    wa_to, wa_from = f"whatsapp:{TEXTER}", f"whatsapp:{OUR_NUMBER}"
    fakes.twilio_plan(("error", 400, 63016, "outside the allowed window"), "ok", "ok")
    refusals = []
    async with twilio_client(fakes) as client:
        with pytest.raises(TwilioRestException) as outside:
            await client.messages.create_async(to=wa_to, from_=wa_from, body="hi")
        text = await client.messages.create_async(to=wa_to, from_=wa_from, body="hi")
        template = await client.messages.create_async(
            to=wa_to, from_=wa_from, content_sid="HX" + "0" * 32, content_variables='{"1": "x"}'
        )
        for to, from_, extra in (
            (wa_to, OUR_NUMBER, {"body": "mixed"}),
            ("whatsapp:5550001111", wa_from, {"body": "not E.164"}),
            (wa_to, wa_from, {"content_sid": "HX" + "0" * 32, "content_variables": "[1"}),
        ):
            with pytest.raises(TwilioRestException) as refused:
                await client.messages.create_async(to=to, from_=from_, **extra)
            refusals.append(refused.value.code)
    assert outside.value.code == 63016
    assert refusals == [63007, 21211, 21656]
    assert [(s["To"], s.get("Body"), s.get("ContentSid")) for s in fakes.twilio_sent] == [
        (wa_to, "hi", None),
        (wa_to, None, "HX" + "0" * 32),
    ]
    assert (text.to, template.to) == (wa_to, wa_to)


@pytest.mark.asyncio
async def test_twilio_accept_then_hang_times_out_but_is_listed(fakes: FakeProviders) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    fakes.twilio_plan(("accept_then_hang", 5))
    async with twilio_client(fakes) as client:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await send_sms(client, body="did it go?")
        found = await client.messages.list_async(
            to=TEXTER, from_=OUR_NUMBER, date_sent_after=before
        )
    assert [m.body for m in found] == ["did it go?"]
    assert found[0].sid == fakes.twilio_sent[0]["sid"]
    assert fakes.twilio_attempts == ["accept_then_hang"]


@pytest.mark.asyncio
async def test_twilio_async_http_client_ignores_its_timeout(fakes: FakeProviders) -> None:
    """Canary for an SDK quirk the service must work around (see fakes.py docstring)."""
    fakes.twilio_plan(("accept_then_hang", 0.6))
    http_client = AsyncTwilioHttpClient(timeout=0.1)
    client = Client(ACCOUNT_SID, AUTH_TOKEN, http_client=http_client)
    client.api.base_url = fakes.base_url
    try:
        started = time.monotonic()
        await send_sms(client)  # no timeout error although 0.6 s > 0.1 s
        assert time.monotonic() - started >= 0.5
    finally:
        await http_client.close()


@pytest.mark.asyncio
async def test_twilio_hang_records_nothing(fakes: FakeProviders) -> None:
    fakes.twilio_plan(("hang", 5))
    async with twilio_client(fakes) as client:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await send_sms(client)
        assert await client.messages.list_async(to=TEXTER) == []
    assert fakes.twilio_attempts == ["hang"] and fakes.twilio_sent == []


@pytest.mark.asyncio
async def test_twilio_list_filters_pages_and_orders_newest_first(fakes: FakeProviders) -> None:
    async with twilio_client(fakes) as client:
        for n in range(5):
            await send_sms(client, body=f"m{n}")
        await client.messages.create_async(to="+15559990000", from_=OUR_NUMBER, body="other")
        mine = await client.messages.list_async(to=TEXTER, from_=OUR_NUMBER, page_size=2)
        future = await client.messages.list_async(
            to=TEXTER, date_sent_after=datetime.now(UTC) + timedelta(minutes=5)
        )
    assert [m.body for m in mine] == ["m4", "m3", "m2", "m1", "m0"]
    assert all(m.status == "sent" and m.date_sent is not None for m in mine)
    assert future == []


def test_twilio_sync_client_works_too(fakes: FakeProviders) -> None:
    client = Client(ACCOUNT_SID, AUTH_TOKEN)
    client.api.base_url = fakes.base_url
    message = client.messages.create(to=TEXTER, from_=OUR_NUMBER, body="sync")
    assert [m.sid for m in client.messages.list(to=TEXTER)] == [message.sid]


# -- sendgrid -----------------------------------------------------------------


def test_sendgrid_send_is_recorded(fakes: FakeProviders) -> None:
    response = sendgrid_client(fakes).send(a_mail())
    assert response.status_code == 202 and response.body == b""
    [sent] = fakes.sendgrid_sent
    assert response.headers["X-Message-Id"] == sent["message_id"]
    assert sent["headers"]["authorization"] == "Bearer SG.test-key"
    assert sent["json"]["subject"] == "Re: hi"
    assert sent["json"]["personalizations"][0]["to"] == [{"email": "alice@example.com"}]


def test_sendgrid_faults_raise_sdk_errors(fakes: FakeProviders) -> None:
    fakes.sendgrid_plan((429, 3), 500, ("error", 400, 0, "Does not contain a valid address."))
    client = sendgrid_client(fakes)
    with pytest.raises(sg_errors.TooManyRequestsError) as limited:
        client.send(a_mail())
    with pytest.raises(sg_errors.InternalServerError):
        client.send(a_mail())
    with pytest.raises(sg_errors.BadRequestsError) as refused:
        client.send(a_mail())
    assert limited.value.headers["Retry-After"] == "3"
    assert b"Does not contain a valid address." in refused.value.body
    assert fakes.sendgrid_attempts == ["429", "500", "error:0"] and fakes.sendgrid_sent == []


def test_sendgrid_hang_hits_client_timeout(fakes: FakeProviders) -> None:
    fakes.sendgrid_plan(("hang", 5))
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        sendgrid_client(fakes, timeout=0.2).send(a_mail())
    assert fakes.sendgrid_sent == []


# -- openai -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_openai_echoes_and_records(fakes: FakeProviders) -> None:
    client = openai_client(fakes)
    completion = await client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "system", "content": "be nice"}, {"role": "user", "content": "ping"}],
    )
    await client.close()
    assert completion.choices[0].message.content == "echo: ping"
    assert completion.model == "gpt-test" and completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert fakes.openai_requests[0]["messages"][0] == {"role": "system", "content": "be nice"}


@pytest.mark.asyncio
async def test_openai_reply_override_and_faults(fakes: FakeProviders) -> None:
    fakes.openai_reply = lambda request: "model=" + request["model"]
    fakes.openai_plan((429, 1), 500, ("hang", 5))
    client = openai_client(fakes, timeout=0.3)
    with pytest.raises(openai.RateLimitError) as limited:
        await ask(client)
    with pytest.raises(openai.InternalServerError):
        await ask(client)
    with pytest.raises(openai.APITimeoutError):
        await ask(client)
    assert await ask(client) == "model=gpt-test"
    await client.close()
    assert limited.value.response.headers["retry-after"] == "1"
    assert fakes.openai_attempts == ["429", "500", "hang", "ok"] and len(fakes.openai_requests) == 1


@pytest.mark.asyncio
async def test_openai_delay_overlaps_concurrent_sdk_requests(fakes: FakeProviders) -> None:
    fakes.openai_delay = 0.5
    client = openai_client(fakes, timeout=30)
    started = time.monotonic()
    replies = await asyncio.gather(*(ask(client, f"q{n}") for n in range(100)))
    elapsed = time.monotonic() - started
    await client.close()
    assert sorted(replies) == sorted(f"echo: q{n}" for n in range(100))
    assert fakes.openai_max_concurrency == 100
    assert elapsed < 5, elapsed  # serial would be 50 s


@pytest.mark.asyncio
async def test_openai_fake_answers_500_concurrent_in_about_the_delay(fakes: FakeProviders) -> None:
    """The fake's own overhead, measured with a light client: the openai SDK
    itself costs ~5-10 ms of CPU per request, so 500 through it take ~4 s."""
    fakes.openai_delay = 1.0
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000)) as session:

        async def one() -> int:
            url = fakes.base_url + "/v1/chat/completions"
            async with session.post(
                url, json=body, headers={"Authorization": "Bearer test"}
            ) as response:
                await response.read()
                return response.status

        started = time.monotonic()
        statuses = await asyncio.gather(*(one() for _ in range(500)))
        elapsed = time.monotonic() - started
    assert statuses == [200] * 500 and fakes.openai_max_concurrency == 500
    assert elapsed < 3, elapsed


# -- waiting ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_wait_for_async_sees_records_from_the_server_thread(fakes: FakeProviders) -> None:
    fakes.openai_delay = 0.2
    client = openai_client(fakes)
    task = asyncio.create_task(ask(client))
    assert await fakes.wait_for_async(lambda: fakes.openai_in_flight == 1, timeout=2)
    assert await task == "echo: hi"
    await client.close()
    assert fakes.wait_for(lambda: fakes.openai_in_flight == 0, timeout=1)
    with pytest.raises(TimeoutError):
        fakes.wait_for(lambda: fakes.twilio_sent, timeout=0.05)
