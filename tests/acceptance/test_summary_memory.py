"""Summary memory (SPEC §12) through the real app: a 60-turn conversation that still knows the
person's name from turn 1, within `history_tokens`; the summary call recorded with its own
purpose and prompt, counted in the model-call budget, never sent; a failed summary call that
does not hold the reply back; delete and `parley forget` take the summary with them."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.cli import main
from service.conversation import estimate_tokens
from service.memory import SUMMARY_PREFIX, SUMMARY_SYSTEM_PROMPT
from service.models import ModelCallWindow
from service.settings import Settings
from tests.conftest import SettingsFactory, running_app
from tests.fakes import FakeProviders, default_openai_reply
from tests.helpers import calls, conversations, eventually, post_twilio, settled, twilio_form

TEXTER = "+15550001111"
ADMIN_TOKEN = "admin-memory-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
NAME = "Ada Lovelace"
FIRST = f"Hi, my name is {NAME} and I would like to order a birthday cake for Saturday."
FILLER = "about the order: the sponge, the icing, the candles, the box and the pickup time " * 2


def summarising(request: dict[str, Any]) -> bool:
    return bool(request["messages"][0]["content"] == SUMMARY_SYSTEM_PROMPT)


def fake_model(request: dict[str, Any]) -> str:
    """Answers like a model that summarises faithfully: the name survives each fold."""
    if summarising(request):
        content = request["messages"][1]["content"]
        known = NAME in content
        return f"The person is {NAME}; they are ordering a birthday cake." if known else "None."
    return default_openai_reply(request)


def memory_settings(make_settings: SettingsFactory, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "assistant_memory": "summary",
        "admin_token": ADMIN_TOKEN,
        "worker_poll_s": 0.05,
        **overrides,
    }
    return make_settings(**values)


async def text(client: httpx.AsyncClient, engine: AsyncEngine, body: str) -> None:
    response = await post_twilio(client, twilio_form(Body=body))
    assert response.status_code == 200, response.text
    await eventually(lambda: settled(engine))


async def test_the_60th_prompt_still_knows_the_name_from_turn_1_within_history_tokens(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_reply = fake_model
    # Under 2,000 a window, places are taken one by one (not in blocks): the count is exact.
    settings = memory_settings(
        make_settings, assistant_history_tokens=800, model_calls_limit="1999/day"
    )
    async with running_app(settings) as client:
        await text(client, engine, FIRST)
        for turn in range(2, 61):
            await text(client, engine, f"Turn {turn}, {FILLER}")
        [listed] = (await client.get("/api/conversations", headers=AUTH)).json()["conversations"]
        detail = (await client.get(f"/api/conversations/{listed['id']}", headers=AUTH)).json()
        page = await client.get(listed["transcript_url"])

    requests = providers.openai_requests
    replies = [r for r in requests if not summarising(r)]
    summaries = [r for r in requests if summarising(r)]
    assert len(replies) == 60 and len(providers.twilio_sent) == 60
    last = replies[-1]
    assert last["messages"][-1]["content"].startswith("Turn 60,")
    summary = last["messages"][1]
    assert summary["role"] == "system" and summary["content"].startswith(SUMMARY_PREFIX)
    assert NAME in summary["content"]
    assert all(NAME not in m["content"] for m in last["messages"][2:])  # only via the summary
    history = sum(estimate_tokens(m["content"]) for m in last["messages"][1:])
    assert history <= 800, history
    # Every reply prompt stayed within the budget too.
    assert (
        max(sum(estimate_tokens(m["content"]) for m in r["messages"][1:]) for r in replies) <= 800
    )
    # The summary is never sent, and each summary call is recorded as one.
    assert all("The person is" not in s["Body"] for s in providers.twilio_sent)
    recorded = await calls(engine)
    assert sorted(c.purpose for c in recorded) == ["reply"] * 60 + ["summary"] * len(summaries)
    assert all(c.status == "ok" for c in recorded)
    assert 5 <= len(summaries) <= 20, len(summaries)
    # Summary calls take their place in MODEL_CALLS_LIMIT's budget like replies do.
    async with engine.connect() as connection:
        counted = await connection.scalar(select(func.sum(ModelCallWindow.calls)))
    assert counted == len(requests)
    # Shown as existing (through which message), never as text.
    [conversation] = await conversations(engine)
    assert conversation.memory_summary and NAME in conversation.memory_summary
    assert detail["memory"] == {
        "summary": True,
        "through_message_id": conversation.memory_through_id,
    }
    assert [c["purpose"] for c in detail["assistant_calls"]].count("summary") == len(summaries)
    assert "remembered by the assistant as a summary" in page.text
    assert "The person is" not in page.text


async def test_a_failed_summary_call_does_not_hold_the_reply_back(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_reply = fake_model
    # Three replies, then the fourth text's summary call fails with a 500.
    providers.openai_plan("ok", "ok", "ok", 500)
    settings = memory_settings(make_settings, assistant_history_messages=4, summary_keep_messages=2)
    async with running_app(settings) as client:
        await text(client, engine, FIRST)
        for turn in range(2, 5):
            await text(client, engine, f"Turn {turn}")
        [conversation] = await conversations(engine)
        assert conversation.memory_summary is None  # the failed fold stored nothing
        await text(client, engine, "Turn 5")  # the next fold succeeds

    assert [s["Body"] for s in providers.twilio_sent] == [
        f"echo: {FIRST}",
        "echo: Turn 2",
        "echo: Turn 3",
        "echo: Turn 4",
        "echo: Turn 5",
    ]
    assert providers.openai_attempts[:5] == ["ok", "ok", "ok", "500", "ok"]
    recorded = [(c.purpose, c.status) for c in await calls(engine)]
    assert recorded[:5] == [("reply", "ok")] * 3 + [("summary", "error"), ("reply", "ok")]
    assert ("summary", "ok") in recorded[5:]
    # The reply that followed the failure was answered from the window, in one try.
    fourth = [r for r in providers.openai_requests if not summarising(r)][3]
    assert all(not m["content"].startswith(SUMMARY_PREFIX) for m in fourth["messages"])
    [conversation] = await conversations(engine)
    assert conversation.memory_summary and NAME in conversation.memory_summary


async def test_delete_and_forget_remove_the_summary_with_the_conversation(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    providers: FakeProviders,
    database_url: str,
    monkeypatch: Any,
) -> None:
    providers.openai_reply = fake_model
    settings = memory_settings(make_settings, assistant_history_messages=4, summary_keep_messages=2)
    async with running_app(settings) as client:
        await text(client, engine, FIRST)
        for turn in range(2, 5):
            await text(client, engine, f"Turn {turn}")
        [conversation] = await conversations(engine)
        assert conversation.memory_summary
        deleted = await client.delete(f"/api/conversations/{conversation.id}", headers=AUTH)
        assert deleted.status_code == 204
        assert await conversations(engine) == []

        for turn in range(1, 5):
            await text(client, engine, FIRST if turn == 1 else f"Again {turn}")
        [again] = await conversations(engine)
        assert again.memory_summary
    monkeypatch.setenv("DATABASE_URL", database_url)
    assert await asyncio.to_thread(main, ["forget", TEXTER, "--yes"]) == 0
    assert await conversations(engine) == []
    assert await calls(engine) == []
