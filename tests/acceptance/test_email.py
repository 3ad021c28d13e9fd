"""The email channel: recorded SendGrid Inbound Parse requests (parsed and raw mode) replayed
through the app; the real openai and sendgrid SDKs talk to fake providers on loopback."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.channels.sendgrid.mime import reply_subject
from service.models import Conversation, Message
from tests.conftest import SettingsFactory, running_app
from tests.email_posts import post_fields, with_fields
from tests.fakes import FakeProviders
from tests.helpers import (
    conversations,
    eventually,
    messages,
    one_warning,
    recorded_body,
    recording,
    replay,
    settled,
)

PARLEY = "assistant@parley.example.com"
INBOUND = "/webhooks/sendgrid/inbound"


def model_input(providers: FakeProviders, index: int = -1) -> list[dict[str, Any]]:
    return providers.openai_requests[index]["messages"]


def sent_mail(providers: FakeProviders, index: int = -1) -> dict[str, Any]:
    return providers.sendgrid_sent[index]["json"]


async def answered(client: httpx.AsyncClient, engine: AsyncEngine, name: str) -> httpx.Response:
    response = await replay(client, f"sendgrid/{name}.json")
    assert response.status_code == 200, response.text
    await eventually(lambda: settled(engine))
    return response


async def count(engine: AsyncEngine, model: Any) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(select(func.count()).select_from(model))).scalar_one())


async def test_first_mail_is_answered_by_a_threaded_reply(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    await answered(client, engine, "gmail_first")

    [conversation] = await conversations(engine)
    assert (conversation.channel, conversation.remote_address, conversation.local_address) == (
        "email",
        "alice@example.com",
        PARLEY,
    )
    user_text = model_input(providers)[-1]["content"]
    assert user_text.startswith("Hi! Could you help me plan a weekend in Lisbon?")
    assert "Alice" not in user_text.split("walking.")[-1]  # the "-- \nAlice" signature is gone
    assert "email" in model_input(providers)[0]["content"]
    mail = sent_mail(providers)
    personalization = mail["personalizations"][0]
    assert personalization["to"] == [{"email": "alice@example.com"}]
    assert mail["from"] == {"email": PARLEY}
    assert mail["subject"] == "Re: Hi"
    headers = mail["headers"]
    assert headers["In-Reply-To"] == "<CAF=first-alice@mail.gmail.com>"
    assert headers["References"] == "<CAF=first-alice@mail.gmail.com>"
    assert headers["Auto-Submitted"] == "auto-replied"
    assert headers["Message-ID"].endswith("@parley.example.com>")
    types = [c["type"] for c in mail["content"]]
    assert types == ["text/plain", "text/html"]
    assert mail["content"][0]["value"] == f"echo: {user_text}"
    reply = (await messages(engine, Message.sender == "assistant"))[0]
    assert reply.headers["Message-ID"] == headers["Message-ID"]  # kept for the next turn
    assert reply.status == "queued" and reply.provider_message_id


async def test_a_reply_to_the_reply_threads_under_it_with_history(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    await answered(client, engine, "gmail_first")
    await answered(client, engine, "gmail_reply")

    assert len(await conversations(engine)) == 1
    turns = model_input(providers)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    latest = turns[-1]["content"]
    assert latest == (  # from the HTML part, whose quote Gmail marks: the line is not wrapped
        "Thanks, that looks great! Could you also suggest a restaurant near the "
        "castle for Saturday evening?"
    )
    assert "wrote:" not in latest and ">" not in latest
    mail = sent_mail(providers)
    assert mail["subject"] == "Re: Hi"  # not "Re: Re: Hi"
    assert mail["headers"]["In-Reply-To"] == "<CAF=reply-alice@mail.gmail.com>"
    assert mail["headers"]["References"].split() == [
        "<CAF=first-alice@mail.gmail.com>",
        "<parley-reply-1@parley.example.com>",
        "<CAF=reply-alice@mail.gmail.com>",
    ]


@pytest.mark.parametrize(
    ("name", "expected", "absent"),
    [
        ("outlook_reply", "Can we pay annually by invoice", ["From: Parley", "Sent:", "_____"]),
        ("apple_mail", "Yes please, book it for Friday.", ["Sent from my iPhone", "wrote:"]),
        ("thunderbird_raw", "Très bien, merci. Où est la gare ?", ["a écrit", "Dave", ">"]),
        (
            "windows1252_parsed",
            "\u20ac1,250 \u2013 is that \u201call in\u201d, including the \u2018premium\u2019",
            ["\ufffd"],
        ),
        (
            "html_only",
            "Option A: rent an espresso machine",
            ["<", "font-family", "&amp;", "&nbsp;"],
        ),
        ("raw_gmail", "Hi! Could you help me plan a weekend in Lisbon?", ["-- "]),
    ],
)
async def test_the_model_sees_the_new_text_only_in_the_right_characters(
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    providers: FakeProviders,
    name: str,
    expected: str,
    absent: list[str],
) -> None:
    await answered(client, engine, name)

    text = model_input(providers)[-1]["content"]
    assert expected in text
    for fragment in absent:
        assert fragment not in text, fragment


async def test_rfc2047_subject_is_decoded_and_replied_once_with_re(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    await answered(client, engine, "thunderbird_raw")

    inbound = (await messages(engine, Message.sender == "user"))[0]
    assert inbound.subject == "Re: Café ouvert ?"
    assert sent_mail(providers)["subject"] == "Re: Café ouvert ?"


async def test_attachments_are_recorded_not_sent_to_the_model(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    await answered(client, engine, "with_attachments")

    inbound = (await messages(engine, Message.sender == "user"))[0]
    attachments = inbound.headers["meta"]["attachments"]
    assert [(a["name"], a["type"]) for a in attachments] == [
        ("dot.png", "image/png"),
        ("booking.pdf", "application/pdf"),
    ]
    assert attachments[0]["size"] == 73 and attachments[1]["size"] == 609
    assert "%PDF" not in model_input(providers)[-1]["content"]


@pytest.mark.parametrize("name", ["out_of_office", "bounce", "list_mail"])
async def test_automatic_mail_is_stored_and_never_answered(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders, name: str
) -> None:
    await answered(client, engine, name)
    await asyncio.sleep(0.1)

    [inbound] = await messages(engine)
    assert inbound.status == "not_answered" and inbound.intent == "no_reply"
    assert providers.openai_requests == [] and providers.sendgrid_sent == []


async def test_mail_from_a_noreply_address_is_stored_and_never_answered(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    # An ordinary-looking mail (no automatic header) from a shop's noreply address: PEERS'
    # loop answered such addresses 64 times.
    data = recording("sendgrid/gmail_first.json")
    body = recorded_body(data).replace(b"alice@example.com", b"noreply@shop.example")
    headers = {k: v for k, v in data["headers"].items() if k.lower() != "content-length"}
    response = await client.post(INBOUND, headers=headers, content=body)
    assert response.status_code == 200
    await eventually(lambda: settled(engine))
    await asyncio.sleep(0.1)

    [inbound] = await messages(engine)
    assert inbound.status == "not_answered" and inbound.intent == "no_reply"
    assert providers.openai_requests == [] and providers.sendgrid_sent == []


async def test_mail_from_an_address_parley_receives_at_is_not_answered(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    await answered(client, engine, "gmail_first")  # makes assistant@… a Parley address
    data = recording("sendgrid/gmail_first.json")
    body = recorded_body(data)
    looped = body.replace(b"alice@example.com", b"assistant@parley.example.com").replace(
        b"CAF=first-alice", b"CAF=looped"
    )
    headers = {k: v for k, v in data["headers"].items() if k.lower() != "content-length"}
    response = await client.post(INBOUND, headers=headers, content=looped)
    assert response.status_code == 200
    await eventually(lambda: settled(engine))

    assert len(providers.sendgrid_sent) == 1  # only the reply to Alice


async def test_a_redelivery_is_answered_once(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    responses = await asyncio.gather(
        *(replay(client, "sendgrid/gmail_first.json") for _ in range(4))
    )
    assert [r.status_code for r in responses] == [200] * 4
    await eventually(lambda: settled(engine))
    await answered(client, engine, "gmail_first")

    assert await count(engine, Message) == 2
    assert len(providers.sendgrid_sent) == 1


async def test_without_message_id_a_redelivery_is_still_recognised(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    fields = with_fields("no_message_id", SPF="pass")  # as recorded it fails SPF (see below)
    for _ in range(2):
        assert (await post_fields(client, fields)).status_code == 200
        await eventually(lambda: settled(engine))

    [inbound] = await messages(engine, Message.sender == "user")
    assert inbound.provider_message_id.startswith("<sha256-")
    assert len(providers.sendgrid_sent) == 1
    assert "In-Reply-To" not in sent_mail(providers)["headers"]


async def nothing_stored(engine: AsyncEngine) -> bool:
    return await count(engine, Message) == 0 and await count(engine, Conversation) == 0


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Basic " + base64.b64encode(b"parley:wrong").decode(),
        "Bearer inbound-secret",
        "Basic !!",
    ],
)
async def test_bad_credentials_are_401_and_nothing_stored(
    client: httpx.AsyncClient, engine: AsyncEngine, authorization: str | None
) -> None:
    data = recording("sendgrid/gmail_first.json")
    headers = {
        k: v
        for k, v in data["headers"].items()
        if k.lower() not in ("authorization", "content-length")
    }
    if authorization:
        headers["Authorization"] = authorization
    response = await client.post(INBOUND, headers=headers, content=recorded_body(data))
    assert response.status_code == 401
    assert "basic" in response.headers["www-authenticate"].lower()
    assert await nothing_stored(engine)


async def test_unset_credentials_refuse_traffic_outside_dev_mode(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    async with running_app(make_settings(sendgrid_inbound_user=None)) as client:
        response = await replay(client, "sendgrid/gmail_first.json")
    assert response.status_code == 401 and "SENDGRID_INBOUND_USER" in response.text
    assert await nothing_stored(engine)


@pytest.mark.parametrize(
    ("content_type", "body", "reason"),
    [
        ("application/json", b'{"from": "a@example.com"}', "multipart/form-data"),
        ("multipart/form-data; boundary=xYzZY", b"--xYzZY\r\nnot a part", "malformed"),
        ("multipart/form-data; boundary=xYzZY", b"\x00\xff not the boundary", "malformed"),
        ("multipart/form-data", b"--xYzZY--\r\n", "boundary"),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nhello\r\n--b--\r\n',
            "sender",
        ),
    ],
)
async def test_malformed_requests_are_400_in_one_line_and_nothing_stored(
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
    content_type: str,
    body: bytes,
    reason: str,
) -> None:
    auth = recording("sendgrid/gmail_first.json")["headers"]["Authorization"]
    caplog.clear()
    response = await client.post(
        INBOUND, headers={"Content-Type": content_type, "Authorization": auth}, content=body
    )
    assert response.status_code == 400
    assert reason in response.text
    one_warning(caplog.records, "status=400")  # python-multipart's own warning was a second
    assert await nothing_stored(engine)


async def test_over_the_size_limit_is_413_decided_while_streaming(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    sent = 0

    async def forty_megabytes() -> Any:  # a well-formed start: only its size is wrong
        nonlocal sent
        yield b'--xYzZY\r\nContent-Disposition: form-data; name="email"\r\n\r\n'
        for _ in range(40 * 16):
            sent += 65536
            yield b"x" * 65536

    auth = recording("sendgrid/gmail_first.json")["headers"]["Authorization"]
    async with running_app(make_settings(max_email_bytes=1_000_000)) as client:
        response = await client.post(
            INBOUND,
            headers={"Content-Type": "multipart/form-data; boundary=xYzZY", "Authorization": auth},
            content=forty_megabytes(),
        )
    assert response.status_code == 413
    assert sent < 3_000_000  # refused soon after the limit, not after 40 MB
    assert await nothing_stored(engine)


def test_reply_subjects_never_stack() -> None:
    assert reply_subject("Hi") == "Re: Hi"
    assert reply_subject("Re: Hi") == "Re: Hi"
    assert reply_subject("RE: Re: re:Hi") == "Re: Hi"
    assert reply_subject("Fwd: Hi") == "Re: Hi"
    assert reply_subject("Fw: RE: Hi") == "Re: Hi"
    assert reply_subject("AW: Hi") == "Re: Hi"
    assert reply_subject("Regarding the plan") == "Re: Regarding the plan"
    assert reply_subject("") == "Re: your message"


async def test_sendgrid_500_is_retried_and_sent_once(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.sendgrid_plan(500)
    async with running_app(make_settings(worker_poll_s=0.05)) as client:
        await answered(client, engine, "gmail_first")

    assert len(providers.sendgrid_sent) == 1
    assert len(providers.openai_requests) == 1  # the stored reply was resent, not regenerated


async def test_sendgrid_400_marks_the_reply_failed(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.sendgrid_plan(("error", 400, 0, "The from address does not match a verified Sender"))
    async with running_app(make_settings(worker_poll_s=0.05)) as client:
        await answered(client, engine, "gmail_first")

    reply = (await messages(engine, Message.sender == "assistant"))[0]
    assert reply.status == "failed" and "400" in reply.error
    assert providers.sendgrid_sent == []


async def test_without_a_sendgrid_key_the_reply_is_stored_not_sent(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(make_settings(sendgrid_api_key=None)) as client:
        await answered(client, engine, "gmail_first")

    reply = (await messages(engine, Message.sender == "assistant"))[0]
    assert reply.status == "not_sent" and reply.subject == "Re: Hi"
    assert providers.sendgrid_sent == []


async def test_an_unknown_charset_is_read_as_well_as_possible_not_refused(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    data = recording("sendgrid/thunderbird_raw.json")
    body = recorded_body(data).replace(b"charset=iso-8859-1", b"charset=x-no-such-charset")
    assert b"x-no-such-charset" in body
    headers = {k: v for k, v in data["headers"].items() if k.lower() != "content-length"}
    response = await client.post(INBOUND, headers=headers, content=body)

    assert response.status_code == 200
    await eventually(lambda: settled(engine))
    [inbound] = await messages(engine, Message.sender == "user")
    assert inbound.body.startswith("Tr")  # stored, with the undecodable letters replaced
    assert len(providers.sendgrid_sent) == 1
