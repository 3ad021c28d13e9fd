"""The operator's API over HTTP: the bearer token on every route, pagination, one
conversation's record, deletion (exactly one person's data), human handoff (pause, resume, an
operator's reply sent once through the same durable path)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.channels.registry import build_channels
from service.models import AssistantCall, Conversation, Message, ReplyJob
from service.settings import Settings
from service.store import conversations as admin
from tests.conftest import PUBLIC_BASE_URL, SettingsFactory, running_app
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

ADMIN_TOKEN = "admin-7f3c9a1e5b2d4c6f8a0b"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TEXTER = "+15550001111"
OTHER = "+15550002222"
FAST: dict[str, Any] = {"worker_poll_s": 0.05, "reply_retry_base_s": 0.05}

ROUTES = [
    ("GET", "/api/conversations"),
    ("GET", "/api/conversations/{id}"),
    ("DELETE", "/api/conversations/{id}"),
    ("POST", "/api/conversations/{id}/pause"),
    ("POST", "/api/conversations/{id}/resume"),
    ("POST", "/api/conversations/{id}/messages"),
]


@pytest.fixture
async def api(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(make_settings(admin_token=ADMIN_TOKEN, **FAST)) as client:
        yield client


async def text(client: httpx.AsyncClient, body: str, sender: str = TEXTER) -> None:
    response = await post_twilio(client, twilio_form(Body=body, From=sender))
    assert response.status_code == 200, response.text


async def done(engine: AsyncEngine) -> None:
    await eventually(lambda: settled(engine))


async def conversation_of(engine: AsyncEngine, remote: str = TEXTER) -> Any:
    [conversation] = await conversations(engine, Conversation.remote_address == remote)
    return conversation


# ---------------------------------------------------------------- the token


async def test_without_admin_token_the_whole_api_is_404(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await text(client, "hi")
    await done(engine)
    conversation = await conversation_of(engine)

    for method, path in [*ROUTES, ("GET", "/api/nothing-here")]:
        response = await client.request(
            method, path.format(id=conversation.id), headers=AUTH, json={"body": "x"}
        )
        assert response.status_code == 404, (method, path)
    assert (await conversation_of(engine)).paused is False


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer",
        "Bearer ",
        "Bearer wrong-token",
        f"Bearer {ADMIN_TOKEN[:-1]}",
        f"Bearer {ADMIN_TOKEN}x",
        f"Basic {ADMIN_TOKEN}",
        ADMIN_TOKEN,
    ],
)
async def test_every_route_wants_the_right_token(
    api: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders, authorization: str
) -> None:
    await text(api, "hi")
    await done(engine)
    conversation = await conversation_of(engine)
    headers = {"Authorization": authorization} if authorization is not None else {}

    for method, path in [*ROUTES, ("GET", "/api/nothing-here")]:
        response = await api.request(
            method, path.format(id=conversation.id), headers=headers, json={"body": "sneaky"}
        )
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert ADMIN_TOKEN not in response.text
    await asyncio.sleep(0.1)
    after = await conversation_of(engine)
    assert after.paused is False
    assert len(await messages(engine)) == 2 and len(providers.twilio_sent) == 1


async def test_every_route_works_with_the_token(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await text(api, "hi")
    await done(engine)
    conversation = await conversation_of(engine)
    expected = [200, 200, 204, 404, 404, 404]  # after the DELETE, the conversation is gone
    statuses = []
    for method, path in ROUTES:
        response = await api.request(
            method, path.format(id=conversation.id), headers=AUTH, json={"body": "x"}
        )
        statuses.append(response.status_code)
    assert statuses == expected
    for method, path in ROUTES[3:]:
        await text(api, "again")
        await done(engine)
        again = await conversation_of(engine)
        response = await api.request(
            method, path.format(id=again.id), headers=AUTH, json={"body": "x"}
        )
        assert response.status_code in (202, 204), (method, path, response.text)
        assert response.headers["cache-control"] == "no-store"


# ---------------------------------------------------------------- listing


async def test_list_is_newest_activity_first_with_everything_an_operator_needs(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    for sender in (TEXTER, OTHER, "+15550003333"):
        await text(api, f"hello from {sender}", sender)
        await done(engine)
    await text(api, "me again", TEXTER)  # TEXTER is now the most recent
    await done(engine)

    response = await api.get("/api/conversations", headers=AUTH)

    assert response.status_code == 200
    data = response.json()
    assert (data["total"], data["page"], data["page_size"]) == (3, 1, 20)
    remotes = [c["remote_address"] for c in data["conversations"]]
    assert remotes == [TEXTER, "+15550003333", OTHER]
    first = data["conversations"][0]
    assert first["summary"] == "hello from +15550001111"
    assert first["channel"] == "sms" and first["local_address"] == "+15559990000"
    assert (first["message_count"], first["user_messages"], first["assistant_messages"]) == (
        4,
        2,
        2,
    )
    assert first["opted_out"] is False and first["paused"] is False
    assert first["created_at"] <= first["updated_at"]
    link = first["transcript_url"]
    assert link.startswith(f"{PUBLIC_BASE_URL}/c/") and len(link.rsplit("/", 1)[1]) >= 32
    page = await api.get(link.removeprefix(PUBLIC_BASE_URL))
    assert page.status_code == 200 and "me again" in page.text


async def test_pagination_pages_and_edges(api: httpx.AsyncClient, engine: AsyncEngine) -> None:
    for n in range(5):
        await text(api, f"person {n}", f"+1555000{n:04d}")
    await done(engine)

    async def page(query: str) -> httpx.Response:
        return await api.get(f"/api/conversations?{query}", headers=AUTH)

    pages = [(await page(f"page={n}&page_size=2")).json() for n in (1, 2, 3, 4)]
    assert [len(p["conversations"]) for p in pages] == [2, 2, 1, 0]  # last page, then empty
    assert {p["total"] for p in pages} == {5}
    ids = [c["id"] for p in pages for c in p["conversations"]]
    assert len(set(ids)) == 5
    assert len((await page("page_size=100")).json()["conversations"]) == 5
    assert (await page("page=999999")).json()["conversations"] == []

    for query in (
        "page=0",
        "page=-1",
        "page=abc",
        "page=1.5",
        "page=",
        "page_size=0",
        "page_size=101",
        "page_size=abc",
        "page_size=-5",
        "page=99999999999999999999999",
    ):
        response = await page(query)
        assert response.status_code == 400, query
        name = query.split("=")[0]
        assert name in response.json()["error"], query


async def test_links_use_the_request_host_without_public_base_url(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    settings = make_settings(admin_token=ADMIN_TOKEN, public_base_url=None)
    async with running_app(settings) as client:
        client.base_url = httpx.URL("http://parley.internal:8000")
        await post_twilio(
            client,
            twilio_form(Body="hi"),
            signed_url="http://parley.internal:8000/webhooks/twilio/sms",
        )
        data = (await client.get("/api/conversations", headers=AUTH)).json()

    assert data["conversations"][0]["transcript_url"].startswith("http://parley.internal:8000/c/")


# ---------------------------------------------------------------- one conversation


async def test_one_conversation_with_messages_oldest_first_and_calls(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await text(api, "one")
    await done(engine)
    await text(api, "two")
    await done(engine)
    conversation = await conversation_of(engine)

    response = await api.get(f"/api/conversations/{conversation.id}", headers=AUTH)

    assert response.status_code == 200
    data = response.json()
    assert data["id"] == conversation.id and data["message_count"] == 4
    assert [(m["sender"], m["body"]) for m in data["messages"]] == [
        ("user", "one"),
        ("assistant", "echo: one"),
        ("user", "two"),
        ("assistant", "echo: two"),
    ]
    reply = data["messages"][1]
    assert reply["author"] == "model" and reply["status"] == "queued"
    assert reply["provider_message_id"].startswith("SM")
    assert reply["reply_to_id"] == data["messages"][0]["id"]
    assert len(data["assistant_calls"]) == 2
    call = data["assistant_calls"][0]
    assert call["status"] == "ok" and call["model"] == "gpt-test"
    assert call["total_tokens"] and call["message_id"] == reply["id"]
    assert "processing_time" in call and "generation_params" in call


@pytest.mark.parametrize(
    "bad_id", ["999999", "0", "99999999999999999999", "abc", "-1", "%00", "%1b%5B2J"]
)
async def test_unknown_ids_are_404_in_lines_without_control_characters(
    api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, bad_id: str
) -> None:
    caplog.set_level(logging.WARNING)
    for method, path in ROUTES[1:]:
        response = await api.request(
            method, path.format(id=bad_id), headers=AUTH, json={"body": "hello"}
        )
        assert response.status_code == 404, (method, path)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == len(ROUTES[1:])  # one each
    assert not [line for line in lines if any(ord(c) < 0x20 or ord(c) == 0x7F for c in line)]


# ---------------------------------------------------------------- deleting


async def _people(api: httpx.AsyncClient, engine: AsyncEngine) -> tuple[Any, Any]:
    for sender in (TEXTER, OTHER):
        await text(api, "first", sender)
        await done(engine)
        await text(api, "second", sender)
        await done(engine)
    return await conversation_of(engine, TEXTER), await conversation_of(engine, OTHER)


async def _data_of(engine: AsyncEngine, conversation_id: int) -> tuple[int, int, int, int]:
    return (
        len(await conversations(engine, Conversation.id == conversation_id)),
        len(await messages(engine, Message.conversation_id == conversation_id)),
        len(await calls(engine, AssistantCall.conversation_id == conversation_id)),
        len(await jobs(engine, ReplyJob.conversation_id == conversation_id)),
    )


async def test_delete_removes_exactly_that_conversation(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    gone, kept = await _people(api, engine)
    kept_before = await _data_of(engine, kept.id)
    assert await _data_of(engine, gone.id) == (1, 4, 2, 2)

    response = await api.delete(f"/api/conversations/{gone.id}", headers=AUTH)

    assert response.status_code == 204 and response.content == b""
    assert await _data_of(engine, gone.id) == (0, 0, 0, 0)
    assert await _data_of(engine, kept.id) == kept_before == (1, 4, 2, 2)
    assert (await api.get(f"/c/{gone.conversation_url}")).status_code == 404
    assert (await api.delete(f"/api/conversations/{gone.id}", headers=AUTH)).status_code == 404


async def test_forget_removes_exactly_that_persons_data(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    gone, kept = await _people(api, engine)
    kept_before = await _data_of(engine, kept.id)

    address = build_channels(Settings(_env_file=None)).normalise_address("+1 (555) 000-1111")
    assert address == TEXTER
    deleted = await admin.forget(engine, address)

    assert deleted == admin.Deleted(conversations=1, messages=4, assistant_calls=2, jobs=2)
    assert await _data_of(engine, gone.id) == (0, 0, 0, 0)
    assert await _data_of(engine, kept.id) == kept_before
    assert await admin.forget(engine, address) == admin.Deleted()


# ---------------------------------------------------------------- human handoff


async def test_pause_stops_the_assistant_and_resume_brings_it_back(
    api: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    await text(api, "hello")
    await done(engine)
    conversation = await conversation_of(engine)
    assert len(providers.openai_requests) == 1

    response = await api.post(f"/api/conversations/{conversation.id}/pause", headers=AUTH)
    assert response.status_code == 204
    await text(api, "are you there?")
    await done(engine)
    await asyncio.sleep(0.2)

    assert len(providers.openai_requests) == 1 and len(providers.twilio_sent) == 1
    paused = (await api.get(f"/api/conversations/{conversation.id}", headers=AUTH)).json()
    assert paused["paused"] is True
    assert (paused["messages"][-1]["body"], paused["messages"][-1]["status"]) == (
        "are you there?",
        "not_answered",
    )

    response = await api.post(f"/api/conversations/{conversation.id}/resume", headers=AUTH)
    assert response.status_code == 204
    await text(api, "hello again")
    await done(engine)

    assert len(providers.openai_requests) == 2
    assert [s["Body"] for s in providers.twilio_sent] == ["echo: hello", "echo: hello again"]
    # The message that came while paused is shown, never answered later.
    assert "are you there?" not in str(providers.openai_requests[-1]["messages"][-1])


async def test_an_operator_reply_goes_out_once_as_the_operators(
    api: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    await text(api, "I want a human")
    await done(engine)
    conversation = await conversation_of(engine)
    await api.post(f"/api/conversations/{conversation.id}/pause", headers=AUTH)

    response = await api.post(
        f"/api/conversations/{conversation.id}/messages",
        headers=AUTH,
        json={"body": "  Hi, this is Sam from the team.  "},
    )

    assert response.status_code == 202
    accepted = response.json()
    assert accepted["conversation_id"] == conversation.id and accepted["status"] == "pending"
    await done(engine)
    await asyncio.sleep(0.2)
    operator_sends = [s for s in providers.twilio_sent if "Sam" in s["Body"]]
    assert len(operator_sends) == 1
    [sent] = operator_sends
    assert (sent["To"], sent["From"], sent["Body"]) == (
        TEXTER,
        "+15559990000",
        "Hi, this is Sam from the team.",
    )
    [stored] = await messages(engine, Message.id.in_(accepted["message_ids"]))
    assert (stored.sender, stored.author, stored.status) == ("assistant", "operator", "queued")
    assert stored.provider_message_id == sent["sid"]
    assert len(providers.openai_requests) == 1  # no model call for the operator's message
    [job] = await jobs(engine, ReplyJob.message_id == stored.id)
    assert job.status == "done"


async def test_an_operator_reply_is_retried_like_any_reply(
    api: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    await text(api, "hi")
    await done(engine)
    conversation = await conversation_of(engine)
    providers.twilio_plan(500, (429, 0.05))

    response = await api.post(
        f"/api/conversations/{conversation.id}/messages", headers=AUTH, json={"body": "Hold on"}
    )

    assert response.status_code == 202
    await providers.wait_for_async(
        lambda: any(s["Body"] == "Hold on" for s in providers.twilio_sent)
    )
    await done(engine)
    assert [s["Body"] for s in providers.twilio_sent].count("Hold on") == 1
    [stored] = await messages(engine, Message.author == "operator")
    assert stored.status == "queued"


async def test_a_long_operator_reply_is_split_in_order(
    api: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    await text(api, "hi")
    await done(engine)
    conversation = await conversation_of(engine)
    words = [f"w{i:04d}" for i in range(600)]  # 3599 characters: three parts

    response = await api.post(
        f"/api/conversations/{conversation.id}/messages",
        headers=AUTH,
        json={"body": " ".join(words)},
    )

    assert response.status_code == 202 and len(response.json()["message_ids"]) == 3
    await done(engine)
    bodies = [s["Body"] for s in providers.twilio_sent][1:]
    assert len(bodies) == 3 and all(len(b) <= 1600 for b in bodies)
    assert " ".join(bodies).split() == words


@pytest.mark.parametrize(
    ("content", "status", "says"),
    [
        ({}, 422, "body"),
        ({"body": ""}, 422, "empty"),
        ({"body": "   \n "}, 422, "empty"),
        ({"body": "x" * 10_001}, 422, "10000"),
        ({"body": 42}, 422, "body"),
        ({"body": "nul\u0000byte"}, 422, "NUL"),
        ({"body": "hi", "extra": 1}, 422, "extra"),
        ([1, 2], 400, "JSON object"),
        ("not json at all", 400, "JSON"),
        ("", 400, "JSON"),
    ],
)
async def test_bad_operator_bodies_are_refused_and_nothing_sent(
    api: httpx.AsyncClient,
    engine: AsyncEngine,
    providers: FakeProviders,
    content: Any,
    status: int,
    says: str,
) -> None:
    await text(api, "hi")
    await done(engine)
    conversation = await conversation_of(engine)
    url = f"/api/conversations/{conversation.id}/messages"

    if isinstance(content, str):
        response = await api.post(url, headers=AUTH, content=content)
    else:
        response = await api.post(url, headers=AUTH, json=content)

    assert response.status_code == status, response.text
    assert says in response.json()["error"]
    await asyncio.sleep(0.05)
    assert len(await messages(engine)) == 2 and len(providers.twilio_sent) == 1


async def test_no_operator_reply_to_someone_who_opted_out(
    api: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    await text(api, "STOP")
    await done(engine)
    conversation = await conversation_of(engine)

    response = await api.post(
        f"/api/conversations/{conversation.id}/messages", headers=AUTH, json={"body": "Hello?"}
    )

    assert response.status_code == 409 and "opted out" in response.json()["error"]
    assert providers.twilio_sent == []
    assert await messages(engine, Message.sender == "assistant") == []


async def test_an_operator_email_threads_like_any_reply(
    api: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    assert (await replay(api, "sendgrid/gmail_first.json")).status_code == 200
    await done(engine)
    conversation = await conversation_of(engine, "alice@example.com")

    response = await api.post(
        f"/api/conversations/{conversation.id}/messages",
        headers=AUTH,
        json={"body": "Sam here: the tram 28 is the one to take."},
    )

    assert response.status_code == 202
    await done(engine)
    model_reply, operator_reply = (s["json"] for s in providers.sendgrid_sent)
    assert operator_reply["personalizations"][0]["to"] == [{"email": "alice@example.com"}]
    assert operator_reply["subject"] == "Re: Hi"
    assert operator_reply["headers"]["In-Reply-To"] == "<CAF=first-alice@mail.gmail.com>"
    assert operator_reply["headers"]["Auto-Submitted"] == "auto-replied"
    assert operator_reply["headers"]["Message-ID"] != model_reply["headers"]["Message-ID"]
    assert operator_reply["content"][0]["value"] == "Sam here: the tram 28 is the one to take."
    [stored] = await messages(engine, Message.author == "operator")
    assert stored.status == "queued" and stored.subject == "Re: Hi"
