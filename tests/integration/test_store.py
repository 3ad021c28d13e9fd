"""The store on a real database (SQLite file, and PostgreSQL when configured): inbound dedupe,
the send protocol's compare-and-set, early delivery reports, and `forget`."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.models import AssistantCall, Conversation, DeliveryReport, Message, ReplyJob
from service.store import conversations, outbox
from service.store.inbound import Recorded, record_inbound
from service.types import Author, Channel, Delivery, Inbound, InboundState, Intent

OUR_NUMBER = "+15550009999"
_sids = itertools.count(1)


def _sms(remote: str, body: str = "hello", sid: str | None = None) -> Inbound:
    return Inbound(Channel.SMS, sid or f"SM{next(_sids):032d}", remote, OUR_NUMBER, body)


async def _record(engine: AsyncEngine, *inbounds: Inbound) -> list[Recorded]:
    async with engine.begin() as connection:
        return await record_inbound(connection, inbounds)


async def _count(engine: AsyncEngine, table: type) -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(select(func.count()).select_from(table)) or 0)


async def _message(engine: AsyncEngine, message_id: int) -> Message:
    async with engine.connect() as connection:
        row = (await connection.execute(select(Message).where(Message.id == message_id))).one()
    return row  # type: ignore[return-value]


async def _answered(engine: AsyncEngine, text_parts: list[str]) -> list[outbox.Part]:
    """A stored inbound message and its pending reply parts."""
    [recorded] = await _record(engine, _sms("+15550001111", "what time is it?"))
    assert recorded.conversation_id and recorded.message_id
    stored = await outbox.store_answer(
        engine,
        outbox.Answer(
            conversation_id=recorded.conversation_id,
            channel=Channel.SMS.value,
            answered_ids=[recorded.message_id],
            parts=text_parts,
            author=Author.MODEL,
            subject=None,
            headers={},
        ),
    )
    assert stored is outbox.Stored.STORED
    return await outbox.unsent_parts(engine, recorded.conversation_id)


async def test_a_redelivered_message_is_stored_and_enqueued_once(engine: AsyncEngine) -> None:
    sid = "SM" + "7" * 32
    [first] = await _record(engine, _sms("+15550001111", "hi", sid))
    [again] = await _record(engine, _sms("+15550001111", "hi", sid))
    [other_from] = await _record(engine, _sms("+15550002222", "hi", sid))  # same id, other From
    assert first.enqueued and not first.duplicate
    assert again.duplicate and not again.enqueued
    assert again.conversation_id == first.conversation_id
    assert other_from.duplicate and other_from.conversation_id is None
    assert (await _count(engine, Message), await _count(engine, ReplyJob)) == (1, 1)
    assert await _count(engine, Conversation) == 1  # no empty conversation left behind
    assert await conversations.is_stored(engine, Channel.SMS.value, sid)


async def test_the_compare_and_set_moves_a_part_to_sending_once(engine: AsyncEngine) -> None:
    [part] = await _answered(engine, ["It is noon."])
    assert part.status == Delivery.PENDING.value
    won = await asyncio.gather(*(outbox.start_sending(engine, part) for _ in range(5)))
    assert sorted(won) == [False] * 4 + [True]
    stored = await _message(engine, part.id)
    assert stored.status == Delivery.SENDING.value
    assert stored.attempted_at is not None


async def test_no_sending_once_the_person_opted_out(engine: AsyncEngine) -> None:
    [part] = await _answered(engine, ["It is noon."])
    await _record(engine, dataclasses.replace(_sms("+15550001111", "STOP"), intent=Intent.OPT_OUT))
    assert not await outbox.start_sending(engine, part)
    assert (await _message(engine, part.id)).status == Delivery.PENDING.value


async def test_an_answer_already_given_elsewhere_stores_nothing(engine: AsyncEngine) -> None:
    [part] = await _answered(engine, ["It is noon."])
    inbound = await _message(engine, part.id)
    again = outbox.Answer(
        conversation_id=part.conversation_id,
        channel=Channel.SMS.value,
        answered_ids=[inbound.reply_to_id],
        parts=["A second answer."],
        author=Author.MODEL,
        subject=None,
        headers={},
    )
    assert await outbox.store_answer(engine, again) is outbox.Stored.ANSWERED_ELSEWHERE
    assert await _count(engine, Message) == 2  # the question and its one reply


async def test_record_sent_merges_a_delivery_report_that_came_first(engine: AsyncEngine) -> None:
    [part] = await _answered(engine, ["It is noon."])
    sid = "SM" + "e" * 32
    assert not await outbox.update_delivery(engine, "sms", sid, Delivery.DELIVERED, None)
    assert await _count(engine, DeliveryReport) == 1  # kept for the send's own answer
    await outbox.record_sent(engine, part.id, part.channel, sid, Delivery.QUEUED)
    stored = await _message(engine, part.id)
    assert (stored.status, stored.provider_message_id) == (Delivery.DELIVERED.value, sid)
    assert await _count(engine, DeliveryReport) == 0
    # a late report never moves it backwards, nor is it kept for later
    assert not await outbox.update_delivery(engine, "sms", sid, Delivery.SENT, None)
    assert (await _message(engine, part.id)).status == Delivery.DELIVERED.value
    assert await _count(engine, DeliveryReport) == 0


async def test_first_unrecorded_skips_sends_another_message_claims(engine: AsyncEngine) -> None:
    first, _second = await _answered(engine, ["part one", "part two"])
    await outbox.record_sent(engine, first.id, first.channel, "SMaaa", Delivery.QUEUED)
    found = await outbox.first_unrecorded(engine, "sms", ["SMaaa", "SMbbb", "SMccc"])
    assert found == "SMbbb"
    assert await outbox.first_unrecorded(engine, "sms", ["SMaaa"]) is None


async def test_forget_deletes_a_persons_conversations_with_everything_in_them(
    engine: AsyncEngine,
) -> None:
    await _answered(engine, ["It is noon."])
    [kept] = await _record(engine, _sms("+15550002222", "hello"))
    await outbox.record_call(
        engine,
        outbox.CallRecord(
            conversation_id=kept.conversation_id or 0,
            model="gpt-test",
            generation_params={},
            processing_time=5,
            ok=True,
        ),
    )
    counted = await conversations.count_address(engine, "+15550001111")
    deleted = await conversations.forget(engine, "+15550001111")
    assert deleted == counted
    assert (deleted.conversations, deleted.messages, deleted.jobs) == (1, 2, 1)
    assert await _count(engine, Conversation) == 1
    assert await _count(engine, Message) == 1
    assert await _count(engine, ReplyJob) == 1
    assert await _count(engine, AssistantCall) == 1  # the other person's
    assert await conversations.forget(engine, "+15550001111") == conversations.Deleted()


async def test_failing_unsent_parts_and_waiting_messages(engine: AsyncEngine) -> None:
    first, second = await _answered(engine, ["part one", "part two"])
    [waiting] = await _record(engine, _sms("+15550001111", "and tomorrow?"))
    assert waiting.message_id is not None
    moved, failed = await outbox.fail_unsent(
        engine, first.conversation_id, "refused", waiting_ids=[waiting.message_id]
    )
    assert (moved, failed) == (1, 2)
    assert (await _message(engine, second.id)).status == Delivery.FAILED.value
    question = await _message(engine, waiting.message_id)
    assert (question.status, question.error) == (InboundState.FAILED.value, "refused")
    assert await outbox.unsent_parts(engine, first.conversation_id) == []


async def test_a_part_left_sending_is_taken_over_by_one_caller_only(engine: AsyncEngine) -> None:
    """After a crash a part found in `sending` is resent only by the caller whose
    compare-and-set moves its `attempted_at` on: a stalled worker holding the old view loses."""
    [part] = await _answered(engine, ["It is noon."])
    assert await outbox.start_sending(engine, part)
    [left] = await outbox.unsent_parts(engine, part.conversation_id)
    assert left.status == Delivery.SENDING.value and left.attempted_at is not None
    won = await asyncio.gather(*(outbox.take_over(engine, left) for _ in range(5)))
    assert sorted(won) == [False] * 4 + [True]
    assert not await outbox.take_over(engine, left)  # its `attempted_at` has moved on
    [again] = await outbox.unsent_parts(engine, part.conversation_id)
    assert again.attempted_at is not None and again.attempted_at > left.attempted_at
