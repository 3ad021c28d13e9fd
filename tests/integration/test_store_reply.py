"""`outbox.store_reply` on a real database: one transaction stores the answer with its model
call's record, the greeting when owed and the first part's compare-and-set; an answer that is
not stored still leaves its call on record."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.models import AssistantCall, Message
from service.store import outbox
from service.store.inbound import Recorded, record_inbound
from service.types import Author, CallStatus, Channel, Delivery, FixedText, Inbound

OUR_NUMBER = "+15550009999"
_sids = itertools.count(1)


async def _inbound(
    engine: AsyncEngine, body: str = "what time is it?", sender: str = "+15550001111"
) -> Recorded:
    inbound = Inbound(Channel.SMS, f"SM{next(_sids):032d}", sender, OUR_NUMBER, body)
    async with engine.begin() as connection:
        [recorded] = await record_inbound(connection, [inbound])
    return recorded


def _answer(recorded: Recorded, text: str, **rest: Any) -> outbox.Answer:
    assert recorded.conversation_id and recorded.message_id
    answer = outbox.Answer(
        conversation_id=recorded.conversation_id,
        channel=Channel.SMS.value,
        answered_ids=[recorded.message_id],
        parts=[text],
        author=Author.MODEL,
        subject=None,
        headers={},
    )
    return dataclasses.replace(answer, **rest)


def _call(recorded: Recorded) -> outbox.CallRecord:
    return outbox.CallRecord(
        conversation_id=recorded.conversation_id or 0,
        model="gpt-test",
        generation_params={},
        processing_time=5,
        ok=True,
    )


def _greeting(recorded: Recorded) -> outbox.Answer:
    greeting = _answer(recorded, "Hi, I am the assistant.")
    return dataclasses.replace(greeting, author=Author.FIXED, fixed_kind=FixedText.GREETING.value)


async def _replies(engine: AsyncEngine) -> list[tuple[int, str, str]]:
    """(id, body, status) of the stored replies, in order."""
    query = select(Message.id, Message.body, Message.status).where(Message.sender == "assistant")
    async with engine.connect() as connection:
        return [tuple(row) for row in await connection.execute(query.order_by(Message.id))]


async def _calls(engine: AsyncEngine) -> list[tuple[str, int | None]]:
    """(status, message_id) of the recorded model calls, in order."""
    query = select(AssistantCall.status, AssistantCall.message_id).order_by(AssistantCall.id)
    async with engine.connect() as connection:
        return [tuple(row) for row in await connection.execute(query)]


async def test_the_answer_its_call_the_greeting_and_the_first_send_in_one_go(
    engine: AsyncEngine,
) -> None:
    first = await _inbound(engine)
    stored = await outbox.store_reply(
        engine,
        _answer(
            first, "It is noon.", call=_call(first), greeting=_greeting(first), start_sending=True
        ),
    )
    assert stored.outcome is outbox.Stored.STORED
    assert [p.body for p in stored.parts] == ["Hi, I am the assistant.", "It is noon."]
    assert [p.held for p in stored.parts] == [True, False]
    greeting, reply = await _replies(engine)
    assert greeting[1:] == ("Hi, I am the assistant.", Delivery.SENDING.value)
    assert reply[1:] == ("It is noon.", Delivery.PENDING.value)
    assert await _calls(engine) == [(CallStatus.OK.value, reply[0])]  # linked to its answer

    second = await _inbound(engine, "and tomorrow?")
    again = await outbox.store_reply(
        engine, _answer(second, "Also noon.", greeting=_greeting(second))
    )
    assert [p.body for p in again.parts] == ["Also noon."]  # greeted once, never again


async def test_an_answer_not_stored_keeps_its_call_on_record(engine: AsyncEngine) -> None:
    first = await _inbound(engine)
    await _inbound(engine, "are you there?")  # newer, still waiting: the answer is superseded
    interrupted = await outbox.store_reply(
        engine, _answer(first, "It is noon.", call=_call(first), interruptible=True)
    )
    assert (interrupted.outcome, interrupted.parts) == (outbox.Stored.INTERRUPTED, [])
    assert await outbox.store_answer(engine, _answer(first, "It is noon.")) is (
        outbox.Stored.STORED
    )
    elsewhere = await outbox.store_reply(engine, _answer(first, "Noon.", call=_call(first)))
    assert elsewhere.outcome is outbox.Stored.ANSWERED_ELSEWHERE
    assert await _calls(engine) == [
        (CallStatus.SUPERSEDED.value, None),
        (CallStatus.OK.value, None),
    ]
    assert [body for _, body, _ in await _replies(engine)] == ["It is noon."]


async def test_answers_stored_at_the_same_moment_each_fare_as_if_stored_alone(
    engine: AsyncEngine,
) -> None:
    """They share a transaction (the group commit); one answered elsewhere meanwhile must
    neither store its parts nor undo its neighbour's answer."""
    answered = await _inbound(engine)
    assert await outbox.store_answer(engine, _answer(answered, "It is noon.")) is (
        outbox.Stored.STORED
    )
    other = await _inbound(engine, "hello?", sender="+15550002222")

    elsewhere, stored = await asyncio.gather(
        outbox.store_reply(engine, _answer(answered, "Noon again.", call=_call(answered))),
        outbox.store_reply(engine, _answer(other, "Hello!", call=_call(other), start_sending=True)),
    )

    assert (elsewhere.outcome, elsewhere.parts) == (outbox.Stored.ANSWERED_ELSEWHERE, [])
    assert stored.outcome is outbox.Stored.STORED and stored.parts[0].held
    assert [(body, status) for _, body, status in await _replies(engine)] == [
        ("It is noon.", Delivery.PENDING.value),
        ("Hello!", Delivery.SENDING.value),
    ]
    reply_ids = [reply_id for reply_id, _, _ in await _replies(engine)]
    assert sorted(await _calls(engine), key=str) == sorted(
        [(CallStatus.OK.value, None), (CallStatus.OK.value, reply_ids[1])], key=str
    )
