"""Storable text through the webhooks (SPEC §9): what the email channel and the reply path store
on SQLite and PostgreSQL (the SMS side is in test_hostile_twilio, the pure rules in unit/).
A value PostgreSQL refuses (NUL, an over-long id, a lone surrogate) must never become a 500."""

from __future__ import annotations

import base64
import hashlib
import json
import logging

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.models import Message
from service.testing import inbound_parse_fields
from tests.conftest import SettingsFactory, running_app
from tests.fakes import FakeProviders
from tests.helpers import (
    conversations,
    eventually,
    messages,
    one_warning,
    post_twilio,
    recorded_body,
    recording,
    settled,
    twilio_form,
)

INBOUND = "/webhooks/sendgrid/inbound"
GMAIL_ID = b"<CAF=first-alice@mail.gmail.com>"
AUTHORIZATION = "Basic " + base64.b64encode(b"parley:inbound-secret").decode()


# ------------------------------------------------------------------ through the email webhook


def gmail_first(*replacements: tuple[bytes, bytes]) -> bytes:
    body = recorded_body(recording("sendgrid/gmail_first.json"))
    for old, new in replacements:
        assert old in body, old
        body = body.replace(old, new)
    return body


async def post_email(client: httpx.AsyncClient, body: bytes) -> httpx.Response:
    headers = recording("sendgrid/gmail_first.json")["headers"]
    return await client.post(
        INBOUND, content=body, headers={k: v for k, v in headers.items() if k != "Content-Length"}
    )


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING)
    return caplog


async def test_a_long_message_id_is_stored_as_its_digest_and_deduplicated(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    long_id = b"<" + b"x" * 300 + b"@mail.gmail.com>"
    body = gmail_first((GMAIL_ID, long_id))
    async with running_app(make_settings(embedded_worker=False)) as client:
        responses = [await post_email(client, body) for _ in range(2)]

    assert [r.status_code for r in responses] == [200, 200]
    [message] = await messages(engine)
    assert message.provider_message_id == "sha256:" + hashlib.sha256(long_id).hexdigest()
    assert "Message-ID" not in (message.headers or {})  # too long to thread by; the digest dedupes
    assert len(await conversations(engine)) == 1


async def test_nul_in_an_email_body_subject_and_message_id_is_removed(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    body = gmail_first(
        (b"Subject: Hi\r\n", b"Subject: H\x00i\x1b\r\n"),
        (GMAIL_ID, b"<CAF=first\x00-alice@mail.gmail.com>"),
        (b"plan a weekend", b"plan a\x00 weekend"),
    )
    async with running_app(make_settings(embedded_worker=False)) as client:
        response = await post_email(client, body)

    assert response.status_code == 200, response.text
    [message] = await messages(engine)
    assert message.subject == "Hi"
    assert message.provider_message_id == GMAIL_ID.decode()
    assert "\x00" not in message.body and "plan a weekend" in message.body


async def test_an_email_from_over_320_characters_is_400_and_nothing_stored(
    make_settings: SettingsFactory, engine: AsyncEngine, logged: pytest.LogCaptureFixture
) -> None:
    body = gmail_first((b"alice@example.com", b"a" * 400 + b"@example.com"))
    async with running_app(make_settings(embedded_worker=False)) as client:
        logged.clear()
        response = await post_email(client, body)

    assert response.status_code == 400
    one_warning(logged.records, "the sender address has 412 characters, more than 320")
    assert await conversations(engine) == [] and await messages(engine) == []


async def test_a_lone_surrogate_decoded_from_an_email_is_stored_as_a_replacement_character(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    fields = inbound_parse_fields(
        "caf+AOk- +2AA- ok", "dave@example.org", "assistant@parley.example.com", "Hi", "<u7@x>"
    )
    fields["charsets"] = json.dumps({**json.loads(fields["charsets"]), "text": "utf-7"})
    assert "\ud800" in b"caf+AOk- +2AA- ok".decode("utf-7")  # what Parley decodes
    async with running_app(make_settings(embedded_worker=False)) as client:
        response = await client.post(
            INBOUND,
            files={name: (None, value) for name, value in fields.items()},
            headers={"Authorization": AUTHORIZATION},
        )

    assert response.status_code == 200, response.text
    [message] = await messages(engine, Message.sender == "user")
    assert message.body == "café \ufffd ok"


async def test_a_model_answer_with_nul_and_controls_is_stored_and_sent_clean(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """PostgreSQL refuses NUL: a model that answers with one must not fail the reply forever."""
    providers.openai_reply = lambda _request: "Open\x00 at 9\x07, closes at 5.\nSee you!"
    async with running_app(make_settings()) as client:
        response = await post_twilio(client, twilio_form(Body="When do you open?"))
        assert response.status_code == 200
        await eventually(lambda: settled(engine))

    [reply] = await messages(engine, Message.sender == "assistant")
    assert (reply.body, reply.status) == ("Open at 9, closes at 5.\nSee you!", "queued")
    assert [m["Body"] for m in providers.twilio_sent] == ["Open at 9, closes at 5.\nSee you!"]
