"""WhatsApp through Twilio as a person and an operator see it: recorded, signed webhooks on the
WhatsApp and the SMS route, replies through the real twilio SDK to the fake Twilio with
`whatsapp:` addresses, the 24-hour window (template or `outside_whatsapp_window`, Twilio's
63016), opt-out, `read` callbacks, the display name and `parley forget`. Both databases."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from service.models import Conversation, Message
from tests.acceptance.test_cli_admin import parley
from tests.conftest import SettingsFactory, running_app
from tests.fakes import FakeProviders
from tests.helpers import (
    PUBLIC_BASE_URL,
    conversations,
    eventually,
    form_of,
    messages,
    post_twilio,
    replay,
    settled,
    twilio_form,
)
from tests.processes import parley_env, serving

TEXTER = "+15550001111"
OUR_NUMBER = "+15559990000"
WA_TEXTER, WA_OURS = f"whatsapp:{TEXTER}", f"whatsapp:{OUR_NUMBER}"
WHATSAPP_PATH = "/webhooks/twilio/whatsapp"
SMS_PATH = "/webhooks/twilio/sms"
TEMPLATE_SID = "HX" + "0123456789abcdef" * 2
ADMIN_TOKEN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FAST: dict[str, Any] = {"worker_poll_s": 0.05, "reply_retry_base_s": 0.05}
OUTSIDE_WINDOW_63016 = ("error", 400, 63016, "Message failed to send: outside the allowed window")


def settings(make_settings: SettingsFactory, **overrides: Any) -> Any:
    return make_settings(**{**FAST, "admin_token": ADMIN_TOKEN, **overrides})


async def whatsapp(
    client: httpx.AsyncClient, body: str, path: str = WHATSAPP_PATH, **fields: str
) -> None:
    """The person sends one WhatsApp message (a fresh MessageSid); Twilio gets its 200."""
    form = twilio_form("twilio/whatsapp_text.json", Body=body, **fields)
    response = await post_twilio(client, form, path=path)
    assert response.status_code == 200, response.text


async def done(engine: AsyncEngine) -> None:
    await eventually(lambda: settled(engine), timeout=15)


async def replies(engine: AsyncEngine) -> list[Any]:
    return await messages(engine, Message.sender == "assistant")


async def the_conversation(engine: AsyncEngine) -> Any:
    [conversation] = await conversations(engine, Conversation.channel == "whatsapp")
    return conversation


async def push_back_last_message(engine: AsyncEngine, hours: float) -> None:
    """The person's messages were written `hours` ago (the window runs from the last one)."""
    async with engine.begin() as connection:
        await connection.execute(
            update(Message)
            .where(Message.sender == "user")
            .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours))
        )


async def operator_says(client: httpx.AsyncClient, conversation_id: int, body: str) -> list[int]:
    response = await client.post(
        f"/api/conversations/{conversation_id}/messages", headers=AUTH, json={"body": body}
    )
    assert response.status_code == 202, response.text
    ids: list[int] = response.json()["message_ids"]
    return ids


# ------------------------------------------------------------------ the channel


async def test_a_recorded_whatsapp_text_is_a_whatsapp_conversation_answered_on_whatsapp(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(settings(make_settings)) as client:
        response = await replay(client, "twilio/whatsapp_text.json")
        assert response.status_code == 200 and "<Response/>" in response.text
        await done(engine)

    conversation = await the_conversation(engine)
    assert (conversation.remote_address, conversation.local_address) == (TEXTER, OUR_NUMBER)
    assert conversation.display_name == "Ana Lima"
    [sent] = providers.twilio_sent
    assert (sent["To"], sent["From"], sent["Body"]) == (
        WA_TEXTER,
        WA_OURS,
        "echo: Hi! Are you open on Sunday?",
    )
    assert sent["StatusCallback"] == f"{PUBLIC_BASE_URL}/webhooks/twilio/status"
    [reply] = await replies(engine)
    assert (reply.channel, reply.provider_message_id) == ("whatsapp", sent["sid"])


async def test_whatsapp_on_the_sms_route_is_the_same_whatsapp_conversation_not_an_sms_one(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(settings(make_settings)) as client:
        await whatsapp(client, "first, on the WhatsApp webhook")
        await done(engine)
        await whatsapp(client, "second, on the SMS webhook", path=SMS_PATH)
        await done(engine)
        sms = twilio_form(Body="an SMS from the same phone")
        assert (await post_twilio(client, sms)).status_code == 200
        await done(engine)

    whatsapp_conversation = await the_conversation(engine)
    inbound = await messages(
        engine, Message.conversation_id == whatsapp_conversation.id, Message.sender == "user"
    )
    assert [m.body for m in inbound] == [
        "first, on the WhatsApp webhook",
        "second, on the SMS webhook",
    ]
    [sms_conversation] = await conversations(engine, Conversation.channel == "sms")
    assert sms_conversation.remote_address == TEXTER
    assert [(s["To"], s["Body"]) for s in providers.twilio_sent] == [
        (WA_TEXTER, "echo: first, on the WhatsApp webhook"),
        (WA_TEXTER, "echo: second, on the SMS webhook"),
        (TEXTER, "echo: an SMS from the same phone"),
    ]


async def test_a_redelivered_whatsapp_message_is_stored_and_answered_once(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(settings(make_settings)) as client:
        first = await replay(client, "twilio/whatsapp_text.json")
        await done(engine)
        again = await replay(client, "twilio/whatsapp_text.json")
        await done(engine)

    assert (first.status_code, again.status_code) == (200, 200)
    assert len(await messages(engine, Message.sender == "user")) == 1
    assert len(providers.twilio_sent) == 1
    assert len(providers.openai_requests) == 1


async def test_a_long_whatsapp_reply_goes_out_in_order_in_parts_of_at_most_1600(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    long_text = " ".join(["word"] * 500)  # the echo is 2,506 characters
    async with running_app(settings(make_settings)) as client:
        await whatsapp(client, long_text)
        await done(engine)

    sent = providers.twilio_sent
    assert len(sent) == 2 and all(len(s["Body"]) <= 1600 for s in sent)
    assert " ".join(s["Body"] for s in sent) == f"echo: {long_text}"
    assert {(s["To"], s["From"]) for s in sent} == {(WA_TEXTER, WA_OURS)}
    assert [r.provider_message_id for r in await replies(engine)] == [s["sid"] for s in sent]


async def test_a_whatsapp_image_is_stored_with_its_media_on_the_whatsapp_conversation(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    async with running_app(settings(make_settings)) as client:
        response = await replay(client, "twilio/whatsapp_image.json")
        await done(engine)

    assert response.status_code == 200
    conversation = await the_conversation(engine)
    [photo] = await messages(engine, Message.sender == "user")
    assert photo.conversation_id == conversation.id
    assert photo.provider_message_id.startswith("MM")
    assert [(m["url"], m["content_type"]) for m in photo.media] == [
        (form_of("twilio/whatsapp_image.json")["MediaUrl0"], "image/jpeg")
    ]


# ------------------------------------------------------------------ the 24-hour window


async def test_outside_the_window_without_a_template_the_reply_fails_without_calling_twilio(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(settings(make_settings)) as client:
        await whatsapp(client, "hello")
        await done(engine)
        await push_back_last_message(engine, hours=25)
        conversation = await the_conversation(engine)
        [operator_id] = await operator_says(client, conversation.id, "Are you still there?")
        await done(engine)

    [late] = await messages(engine, Message.id == operator_id)
    assert (late.status, late.error) == ("failed", "outside_whatsapp_window")
    assert [s["Body"] for s in providers.twilio_sent] == ["echo: hello"]  # no second call


async def test_outside_the_window_the_template_goes_out_instead_with_the_first_1000_chars(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    operator_text = "Your order is ready. " * 60  # 1,260 characters
    async with running_app(settings(make_settings, whatsapp_template_sid=TEMPLATE_SID)) as client:
        await whatsapp(client, "hello")
        await done(engine)
        await push_back_last_message(engine, hours=25)
        conversation = await the_conversation(engine)
        [operator_id] = await operator_says(client, conversation.id, operator_text)
        await done(engine)

    first, template = providers.twilio_sent
    assert "ContentSid" not in first and first["Body"] == "echo: hello"
    assert (template["To"], template["From"], template["ContentSid"]) == (
        WA_TEXTER,
        WA_OURS,
        TEMPLATE_SID,
    )
    assert "Body" not in template
    assert json.loads(template["ContentVariables"]) == {"1": operator_text.strip()[:1000]}
    [stored] = await messages(engine, Message.id == operator_id)
    assert (stored.status, stored.provider_message_id) == ("queued", template["sid"])


async def test_outside_the_window_a_reply_in_several_parts_is_one_template(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    operator_text = " ".join(f"w{i:04d}" for i in range(500))  # 2,999 characters: two parts
    async with running_app(settings(make_settings, whatsapp_template_sid=TEMPLATE_SID)) as client:
        await whatsapp(client, "hello")
        await done(engine)
        await push_back_last_message(engine, hours=25)
        conversation = await the_conversation(engine)
        first_id, second_id = await operator_says(client, conversation.id, operator_text)
        await done(engine)
        page = (await client.get(f"/c/{conversation.conversation_url}")).text

    _, template = providers.twilio_sent  # one send for the reply, not one a part
    assert (template["ContentSid"], "Body" in template) == (TEMPLATE_SID, False)
    assert json.loads(template["ContentVariables"]) == {"1": operator_text[:1000]}
    [first] = await messages(engine, Message.id == first_id)
    [second] = await messages(engine, Message.id == second_id)
    assert (first.part, first.status, first.provider_message_id) == (1, "queued", template["sid"])
    assert (second.part, second.status, second.provider_message_id) == (2, "not_sent", None)
    assert second.error is not None and second.error.startswith("outside_whatsapp_window")
    assert page.count("not sent: outside_whatsapp_window") == 1  # the transcript says why


async def test_within_the_window_the_reply_is_free_form_even_with_a_template(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(settings(make_settings, whatsapp_template_sid=TEMPLATE_SID)) as client:
        await whatsapp(client, "hello")
        await done(engine)
        await push_back_last_message(engine, hours=23)
        conversation = await the_conversation(engine)
        await operator_says(client, conversation.id, "Still here")
        await done(engine)

    assert [(s.get("Body"), s.get("ContentSid")) for s in providers.twilio_sent] == [
        ("echo: hello", None),
        ("Still here", None),
    ]


async def test_twilio_63016_without_a_template_fails_the_reply_and_is_never_retried(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.twilio_plan(OUTSIDE_WINDOW_63016)
    async with running_app(settings(make_settings)) as client:
        await whatsapp(client, "hello")
        await done(engine)

    assert providers.twilio_attempts == ["error:63016"]
    [reply] = await replies(engine)
    assert (reply.status, reply.error) == ("failed", "outside_whatsapp_window")


async def test_twilio_63016_with_a_template_sends_the_template_at_once(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.twilio_plan(OUTSIDE_WINDOW_63016)
    async with running_app(settings(make_settings, whatsapp_template_sid=TEMPLATE_SID)) as client:
        await whatsapp(client, "hello")
        await done(engine)

    assert providers.twilio_attempts == ["error:63016", "ok"]
    [template] = providers.twilio_sent
    assert template["ContentSid"] == TEMPLATE_SID and "Body" not in template
    assert json.loads(template["ContentVariables"]) == {"1": "echo: hello"}
    [reply] = await replies(engine)
    assert (reply.status, reply.provider_message_id) == ("queued", template["sid"])


async def test_after_a_63016_a_retried_reply_goes_as_the_template_never_free_form_again(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """Twilio says the window closed, then fails the template send with a 500: the job's
    next try sends the template, not the free-form message Twilio already refused."""
    providers.twilio_plan(OUTSIDE_WINDOW_63016, 500)
    async with running_app(settings(make_settings, whatsapp_template_sid=TEMPLATE_SID)) as client:
        await whatsapp(client, "hello")
        await done(engine)

    assert providers.twilio_attempts == ["error:63016", "500", "ok"]
    [template] = providers.twilio_sent
    assert template["ContentSid"] == TEMPLATE_SID and "Body" not in template
    [reply] = await replies(engine)
    assert (reply.status, reply.provider_message_id) == ("queued", template["sid"])


# ------------------------------------------------------------------ opt-out, status, names


async def test_stop_and_opt_out_type_silence_whatsapp_and_start_resumes(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(settings(make_settings)) as client:
        await whatsapp(client, "STOP")
        await done(engine)
        await whatsapp(client, "are you there?")
        await done(engine)
        silenced = (await the_conversation(engine)).opted_out
        await whatsapp(client, "START")
        await done(engine)
        await whatsapp(client, "back again")
        await done(engine)
        await whatsapp(client, "no more please", OptOutType="STOP")
        await done(engine)

    assert silenced
    assert [s["Body"] for s in providers.twilio_sent] == ["echo: back again"]
    assert (await the_conversation(engine)).opted_out


async def test_a_read_callback_moves_the_reply_to_read_and_a_late_delivered_does_not(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    async with running_app(settings(make_settings)) as client:
        await whatsapp(client, "hello")
        await done(engine)
        [reply] = await replies(engine)
        sid = reply.provider_message_id
        read = twilio_form("twilio/whatsapp_status_read.json", MessageSid=sid, SmsSid=sid)
        late = {**read, "MessageStatus": "delivered", "SmsStatus": "delivered"}
        status_path = "/webhooks/twilio/status"
        answers = [
            (await post_twilio(client, form, path=status_path)).status_code for form in (read, late)
        ]

        exposition = (await client.get("/metrics")).text

    assert answers == [204, 204]
    [reply] = await replies(engine)
    assert reply.status == "read"
    for series in (
        'parley_webhooks_total{channel="whatsapp",kind="message",result="accepted"}',
        'parley_webhooks_total{channel="whatsapp",kind="status",result="applied"}',
    ):
        assert series in exposition, series


async def test_the_profile_name_is_shown_in_the_api_and_the_transcript(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    async with running_app(settings(make_settings)) as client:
        await replay(client, "twilio/whatsapp_text.json")
        await done(engine)
        await whatsapp(client, "renamed", ProfileName="Ana L.")
        await done(engine)
        listed = (await client.get("/api/conversations", headers=AUTH)).json()
        conversation = await the_conversation(engine)
        page = await client.get(f"/c/{conversation.conversation_url}")

    [item] = listed["conversations"]
    assert (item["channel"], item["remote_address"], item["display_name"]) == (
        "whatsapp",
        TEXTER,
        "Ana L.",  # the latest name wins
    )
    assert page.status_code == 200
    assert "WhatsApp conversation with" in page.text and "(Ana L.)" in page.text


async def test_conversations_lists_and_forget_deletes_a_whatsapp_conversation(
    make_settings: SettingsFactory, engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    async with running_app(settings(make_settings)) as client:
        await replay(client, "twilio/whatsapp_text.json")
        await done(engine)

    listed = parley(["conversations"], database_url, tmp_path)
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if "whatsapp" in line]
    assert f"{TEXTER} (Ana Lima)" in row

    result = parley(["forget", WA_TEXTER, "--yes"], database_url, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("deleted 1 conversation(s), 2 message(s)")
    assert await conversations(engine) == []


# ------------------------------------------------------------------ safety, the command line


async def test_a_timeout_after_twilio_accepted_is_looked_up_and_never_sent_twice(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.twilio_plan(("accept_then_hang", 5))
    overrides = {"provider_timeout_s": 0.5}
    async with running_app(settings(make_settings, **overrides)) as client:
        await whatsapp(client, "hello")
        await done(engine)

    assert providers.twilio_attempts == ["accept_then_hang"]
    [sent] = providers.twilio_sent
    assert (sent["To"], sent["From"]) == (WA_TEXTER, WA_OURS)
    [reply] = await replies(engine)
    assert (reply.status, reply.provider_message_id) == ("queued", sent["sid"])


def test_parley_whatsapp_messages_a_running_server_as_whatsapp_would(
    database_url: str, tmp_path: Path
) -> None:
    env = parley_env(DATABASE_URL=database_url)
    with serving(env, tmp_path, ("--dev",)) as (port, _):
        result = parley(
            ["whatsapp", "hello there", "--name", "Ana", "--url", f"http://127.0.0.1:{port}"],
            database_url,
            tmp_path,
        )
        listed = parley(["conversations"], database_url, tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("parley> "), result.stdout
    [row] = [line for line in listed.stdout.splitlines() if "whatsapp" in line]
    assert f"{TEXTER} (Ana)" in row and "hello there" in row
