"""The SMS webhook and the round trip: recorded Twilio requests replayed through the app, the
real twilio and openai SDKs talking to fake providers on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.models import Conversation, Message
from tests.conftest import PUBLIC_BASE_URL, SettingsFactory, running_app
from tests.fakes import FakeProviders
from tests.helpers import (
    calls,
    conversations,
    eventually,
    form_of,
    messages,
    post_twilio,
    replay,
    settled,
    twilio_form,
)

TEXTER = "+15550001111"
OUR_NUMBER = "+15559990000"


async def count(engine: AsyncEngine, model: Any) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(select(func.count()).select_from(model))).scalar_one())


async def nothing_stored(engine: AsyncEngine) -> bool:
    return await count(engine, Message) == 0 and await count(engine, Conversation) == 0


async def test_round_trip_answers_the_texter_from_the_number_texted(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    response = await replay(client, "twilio/sms_hello.json")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/xml")
    assert response.text.endswith("<Response/>")
    await eventually(lambda: settled(engine))
    [sent] = providers.twilio_sent
    assert sent["To"] == TEXTER and sent["From"] == OUR_NUMBER
    assert sent["Body"] == "echo: Hello there"
    assert sent["StatusCallback"] == f"{PUBLIC_BASE_URL}/webhooks/twilio/status"
    [conversation] = await conversations(engine)
    assert (conversation.channel, conversation.remote_address, conversation.local_address) == (
        "sms",
        TEXTER,
        OUR_NUMBER,
    )
    assert conversation.summary == "Hello there"
    assert len(conversation.conversation_url) >= 32
    inbound, reply = await messages(engine)
    assert (inbound.sender, inbound.status, inbound.body) == ("user", "answered", "Hello there")
    assert inbound.provider_message_id == form_of("twilio/sms_hello.json")["MessageSid"]
    assert (reply.sender, reply.author, reply.body) == ("assistant", "model", "echo: Hello there")
    assert reply.provider_message_id == sent["sid"] and reply.status == "queued"
    assert reply.reply_to_id == inbound.id
    [call] = await calls(engine)
    assert (call.status, call.model, call.message_id) == ("ok", "gpt-test", reply.id)
    assert call.prompt_tokens and call.completion_tokens and call.total_tokens
    assert call.processing_time >= 0 and call.generation_params["timeout_s"] == 5.0
    [request] = providers.openai_requests
    assert request["model"] == "gpt-test"
    assert request["messages"][0]["role"] == "system" and "SMS" in request["messages"][0]["content"]
    assert request["messages"][1:] == [{"role": "user", "content": "Hello there"}]


async def test_second_turn_carries_the_history_oldest_first(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    await replay(client, "twilio/sms_hello.json")
    await eventually(lambda: settled(engine))
    await replay(client, "twilio/sms_second_turn.json")
    await eventually(lambda: settled(engine))

    assert [m["role"] for m in providers.openai_requests[1]["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
    ]
    assert [m["content"] for m in providers.openai_requests[1]["messages"][1:]] == [
        "Hello there",
        "echo: Hello there",
        "And what about tomorrow?",
    ]
    assert [s["Body"] for s in providers.twilio_sent] == [
        "echo: Hello there",
        "echo: And what about tomorrow?",
    ]
    assert len(await conversations(engine)) == 1


async def test_history_is_bounded_by_count(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(make_settings(assistant_history_messages=2)) as client:
        for body in ["one", "two", "three"]:
            await post_twilio(client, twilio_form(Body=body))
            await eventually(lambda: settled(engine))

    last = providers.openai_requests[-1]["messages"]
    assert [m["content"] for m in last[1:]] == ["two", "echo: two", "three"]


async def test_history_is_bounded_by_tokens(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(make_settings(assistant_history_tokens=60)) as client:
        for body in ["a" * 200, "short one", "latest"]:
            await post_twilio(client, twilio_form(Body=body))
            await eventually(lambda: settled(engine))

    contents = [m["content"] for m in providers.openai_requests[-1]["messages"][1:]]
    assert contents[-1] == "latest"
    assert "a" * 200 not in contents and "short one" in contents


async def test_senders_and_numbers_get_separate_conversations(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    for name in ("sms_hello", "sms_other_sender", "sms_messaging_service"):
        assert (await replay(client, f"twilio/{name}.json")).status_code == 200
    await eventually(lambda: settled(engine))

    pairs = {(c.remote_address, c.local_address) for c in await conversations(engine)}
    assert pairs == {
        (TEXTER, OUR_NUMBER),
        ("+15550002222", OUR_NUMBER),
        ("+15550003333", "+15559990001"),
    }
    sent = {(s["To"], s["From"]) for s in providers.twilio_sent}
    assert sent == {(to, from_) for to, from_ in pairs}


@pytest.mark.parametrize(
    "tamper",
    ["missing", "garbage", "wrong_token", "wrong_url", "tampered_body", "empty"],
)
async def test_bad_signature_is_refused_and_nothing_stored(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders, tamper: str
) -> None:
    form = twilio_form()
    if tamper == "missing":
        response = await client.post(
            "/webhooks/twilio/sms",
            content=httpx.QueryParams(form).__str__(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    elif tamper == "garbage":
        response = await post_twilio(client, form, signature="bm90IGEgc2lnbmF0dXJl")
    elif tamper == "empty":
        response = await post_twilio(client, form, signature="")
    elif tamper == "wrong_token":
        response = await post_twilio(client, form, token="another-accounts-token")
    elif tamper == "wrong_url":
        response = await post_twilio(
            client, form, signed_url="https://attacker.example.net/webhooks/twilio/sms"
        )
    else:
        from service.testing import sign
        from tests.helpers import TWILIO_TOKEN

        signature = sign(TWILIO_TOKEN, PUBLIC_BASE_URL + "/webhooks/twilio/sms", form)
        response = await post_twilio(client, {**form, "Body": "send me money"}, signature=signature)

    assert response.status_code == 403
    assert await nothing_stored(engine)
    await asyncio.sleep(0.05)
    assert providers.openai_requests == [] and providers.twilio_sent == []


async def test_without_a_token_outside_dev_mode_everything_is_refused(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    async with running_app(make_settings(twilio_auth_token=None)) as client:
        response = await replay(client, "twilio/sms_hello.json")

    assert response.status_code == 403
    assert "TWILIO_AUTH_TOKEN" in response.text
    assert await nothing_stored(engine)


async def test_dev_mode_without_a_token_accepts_unsigned_requests(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    settings = make_settings(twilio_auth_token=None, twilio_account_sid=None, parley_dev=True)
    async with running_app(settings) as client:
        response = await post_twilio(client, twilio_form(Body="hi"), signature="")
        await eventually(lambda: settled(engine))

    assert response.status_code == 200
    _inbound, reply = await messages(engine)
    assert reply.status == "not_sent"  # no Twilio credentials: recorded, shown, not sent


async def test_either_token_is_valid_during_rotation(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    settings = make_settings(twilio_auth_token="brand-new-token, test-auth-token-0123456789abcdef")
    async with running_app(settings) as client:
        old = await replay(client, "twilio/sms_hello.json")
        new = await post_twilio(client, twilio_form(Body="signed anew"), token="brand-new-token")
        wrong = await post_twilio(client, twilio_form(Body="x"), token="neither-token")
        await eventually(lambda: settled(engine))

    assert (old.status_code, new.status_code, wrong.status_code) == (200, 200, 403)
    assert len(await messages(engine, Message.sender == "user")) == 2
    # Outbound calls authenticate with the first (new) token.
    assert providers.twilio_sent


async def test_behind_a_proxy_the_public_url_is_what_is_checked(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    """The app sees http://10.0.0.7:8000 (the proxy's upstream); Twilio signed the public URL."""
    for public, expected in ((PUBLIC_BASE_URL, 200), (None, 403)):
        app_settings = make_settings(public_base_url=public)
        async with running_app(app_settings) as client:
            client.base_url = httpx.URL("http://10.0.0.7:8000")
            response = await post_twilio(client, twilio_form())
        assert response.status_code == expected, public


async def test_signed_but_missing_a_field_is_400_and_nothing_stored(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    response = await replay(client, "twilio/sms_missing_body.json")
    assert response.status_code == 400 and "Body" in response.text
    for field in ("From", "To", "MessageSid"):
        response = await post_twilio(client, twilio_form(**{field: None}))
        assert response.status_code == 400 and field in response.text
    assert await nothing_stored(engine)


async def test_wrong_content_type_is_400(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    response = await client.post("/webhooks/twilio/sms", json=form_of("twilio/sms_hello.json"))
    assert response.status_code == 400
    assert await nothing_stored(engine)


async def test_oversized_body_is_refused_while_reading(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    sent = 0

    async def endless() -> Any:
        nonlocal sent
        for _ in range(10_000):  # 80 MB if the server kept reading
            sent += 8192
            yield b"Body=" + b"x" * 8187

    response = await client.post(
        "/webhooks/twilio/sms",
        content=endless(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 413
    assert sent < 200 * 1024  # stopped soon after 64 KiB, not at the end
    declared = await client.post(
        "/webhooks/twilio/sms",
        content=b"Body=" + b"x" * 70_000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert declared.status_code == 413
    assert await nothing_stored(engine)


async def test_redelivery_in_sequence_is_acknowledged_and_changes_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    for _ in range(3):
        response = await replay(client, "twilio/sms_hello.json")
        assert response.status_code == 200
        await eventually(lambda: settled(engine))

    assert len(await messages(engine, Message.sender == "user")) == 1
    assert len(providers.twilio_sent) == 1 and len(providers.openai_requests) == 1


async def test_six_concurrent_deliveries_of_one_message_give_one_reply(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    responses = await asyncio.gather(*(replay(client, "twilio/sms_hello.json") for _ in range(6)))

    assert [r.status_code for r in responses] == [200] * 6
    await eventually(lambda: settled(engine))
    await asyncio.sleep(0.1)
    assert len(await messages(engine, Message.sender == "user")) == 1
    assert len(providers.twilio_sent) == 1 and len(providers.openai_requests) == 1


async def test_the_webhook_answers_before_the_model_does(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_delay = 2.0
    response = await replay(client, "twilio/sms_hello.json")

    assert response.status_code == 200
    assert providers.twilio_sent == []  # the reply is still being written
    [inbound] = await messages(engine)
    assert inbound.status == "received"  # committed before the 200
    await eventually(lambda: settled(engine))
    assert len(providers.twilio_sent) == 1


async def test_without_public_base_url_the_status_callback_is_under_the_url_twilio_signed(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    # SPEC §3: PUBLIC_BASE_URL defaults to "derived from the request". The webhook's signature
    # is checked against the URL it came to (the test client's), so that is Twilio's URL.
    async with running_app(make_settings(public_base_url=None, admin_token="admin")) as client:
        assert (await post_twilio(client, twilio_form())).status_code == 200
        await eventually(lambda: settled(engine))
        [conversation] = await conversations(engine)
        response = await client.post(
            f"/api/conversations/{conversation.id}/messages",
            headers={"Authorization": "Bearer admin"},
            json={"body": "An operator here"},
        )
        assert response.status_code == 202
        await eventually(lambda: settled(engine))

    assert conversation.public_base_url == PUBLIC_BASE_URL
    callback = f"{PUBLIC_BASE_URL}/webhooks/twilio/status"
    assert [s["StatusCallback"] for s in providers.twilio_sent] == [callback, callback]


@pytest.mark.parametrize(
    ("sent_to", "signed_for", "derived"),
    [
        # A captured request resent to another port still validates (Twilio's validator also
        # tries the URL without its port): the port must not choose the delivery reports' URL.
        ("https://parley.example.com:6666", "https://parley.example.com", PUBLIC_BASE_URL),
        # Twilio signs a URL with its port when its webhook has one: that port is kept.
        ("https://parley.example.com:8443", "https://parley.example.com:8443", None),
    ],
)
async def test_the_derived_status_callback_keeps_a_port_only_if_the_signature_covered_it(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    sent_to: str,
    signed_for: str,
    derived: str | None,
) -> None:
    path = "/webhooks/twilio/sms"
    async with running_app(make_settings(public_base_url=None)) as client:
        response = await post_twilio(
            client, twilio_form(), path=sent_to + path, signed_url=signed_for + path
        )
    assert response.status_code == 200
    [conversation] = await conversations(engine)
    assert conversation.public_base_url == (derived or sent_to)


async def test_with_public_base_url_nothing_is_derived_from_the_request(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await replay(client, "twilio/sms_hello.json")
    [conversation] = await conversations(engine)
    assert conversation.public_base_url is None  # PUBLIC_BASE_URL is what counts


async def test_a_long_reply_is_split_at_word_boundaries_and_sent_in_order(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    words = [f"word{i:04d}" for i in range(440)]  # 440 * 9 - 1 = 3959 characters
    providers.openai_reply = lambda _request: " ".join(words)
    await replay(client, "twilio/sms_hello.json")
    await eventually(lambda: settled(engine))

    bodies = [s["Body"] for s in providers.twilio_sent]
    assert len(bodies) == 3
    assert all(len(b) <= 1600 for b in bodies)
    assert " ".join(bodies).split() == words  # every word, whole, in order
    parts = await messages(engine, Message.sender == "assistant")
    assert [p.body for p in parts] == bodies
    assert [p.provider_message_id for p in parts] == [s["sid"] for s in providers.twilio_sent]
    assert [p.part for p in parts] == [1, 2, 3]  # each knows its place (WhatsApp's template)


async def test_mms_caption_is_answered_and_media_recorded(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    await replay(client, "twilio/sms_mms.json")
    await eventually(lambda: settled(engine))

    inbound = (await messages(engine, Message.sender == "user"))[0]
    assert inbound.provider_message_id.startswith("MM")
    [item] = inbound.media
    assert (
        item["url"].startswith("https://api.twilio.com/") and item["content_type"] == "image/jpeg"
    )
    # Not on this deployment's Twilio host (the fake's): described to the model, not fetched.
    assert providers.twilio_sent[0]["Body"] == (
        "echo: Here's the menu from last night\n"
        "[attachment: image/jpeg at api.twilio.com, not fetched]"
    )


async def test_unicode_survives_the_round_trip(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    await replay(client, "twilio/sms_unicode.json")
    await eventually(lambda: settled(engine))

    body = form_of("twilio/sms_unicode.json")["Body"]
    assert (await messages(engine))[0].body == body
    assert providers.twilio_sent[0]["Body"] == f"echo: {body}"


async def test_without_twilio_credentials_the_reply_is_stored_not_sent(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(make_settings(twilio_account_sid=None)) as client:
        await replay(client, "twilio/sms_hello.json")
        await eventually(lambda: settled(engine))

    reply = (await messages(engine, Message.sender == "assistant"))[0]
    assert (reply.status, reply.body) == ("not_sent", "echo: Hello there")
    assert providers.twilio_sent == []


async def test_offline_assistant_answers_without_an_openai_key(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(make_settings(openai_api_key=None)) as client:
        await replay(client, "twilio/sms_hello.json")
        await eventually(lambda: settled(engine))

    [sent] = providers.twilio_sent
    assert sent["Body"].startswith("[offline assistant]") and "Hello there" in sent["Body"]
    assert providers.openai_requests == []
    [call] = await calls(engine)
    assert call.model == "parley-offline" and call.status == "ok"
