"""Storing a profile's fixed texts (SPEC §11): the greeting, once, before a conversation's
first reply, and the after-hours reply, once per closed period. Each is one transaction whose
condition makes "once" hold across retries, crashes and racing workers."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db import utcnow
from service.models import Conversation, Message
from service.store.outbox import Answer, _insert_parts
from service.types import InboundState, Sender

ALREADY_TOLD = "outside opening hours: the after-hours reply was already sent"
CLOSED = "outside opening hours"


async def store_greeting(engine: AsyncEngine, greeting: Answer) -> bool:
    """The greeting's parts, unless the conversation already has an assistant message (it is
    not new, or it was greeted). It answers nothing: the reply that follows does."""
    async with engine.begin() as connection:
        replied = await connection.scalar(
            select(Message.id)
            .where(
                Message.conversation_id == greeting.conversation_id,
                Message.sender == Sender.ASSISTANT.value,
            )
            .limit(1)
        )
        if replied is not None:
            return False
        await _insert_parts(connection, greeting)
    return True


async def store_after_hours(engine: AsyncEngine, reply: Answer, period: str) -> bool:
    """The after-hours reply if this closed period has not had one in this conversation, the
    answered messages `answered`; otherwise they are `not_answered` with the reason. True when
    the reply was stored."""
    async with engine.begin() as connection:
        claimed = await connection.execute(
            update(Conversation)
            .where(
                Conversation.id == reply.conversation_id,
                or_(
                    Conversation.after_hours_period.is_(None),
                    Conversation.after_hours_period != period,
                ),
            )
            .values(after_hours_period=period)
        )
        if not claimed.rowcount:
            await _mark(connection, reply.answered_ids, InboundState.NOT_ANSWERED, ALREADY_TOLD)
            return False
        await _mark(connection, reply.answered_ids, InboundState.ANSWERED, None)
        await _insert_parts(connection, reply)
    return True


async def _mark(
    connection: AsyncConnection, ids: Sequence[int], state: InboundState, error: str | None
) -> None:
    await connection.execute(
        update(Message)
        .where(Message.id.in_(ids), Message.status == InboundState.RECEIVED.value)
        .values(status=state.value, error=error, updated_at=utcnow())
    )
