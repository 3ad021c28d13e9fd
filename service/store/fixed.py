"""Storing a profile's fixed texts (SPEC §11): the greeting, once, before a conversation's
first reply (`outbox.insert_greeting`, in the transaction of the reply it comes before), and
the after-hours reply, once per closed period. Each condition is checked in the transaction
that stores, so "once" holds across retries, crashes and racing workers."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import or_, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db import utcnow
from service.models import Conversation, Message
from service.store.outbox import Answer, Part, insert_greeting, insert_parts, start_first
from service.types import InboundState

ALREADY_TOLD = "outside opening hours: the after-hours reply was already sent"
CLOSED = "outside opening hours"


async def store_after_hours(
    engine: AsyncEngine, reply: Answer, period: str, *, start_sending: bool = False
) -> list[Part]:
    """The after-hours reply (its greeting first when owed, `reply.greeting`) if this closed
    period has not had one in this conversation, the answered messages `answered`; otherwise
    they are `not_answered` with the reason. Returns the parts stored, in the order they go
    out (the first moved to `sending` when `start_sending` won its compare-and-set)."""
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
            return []
        parts = await insert_greeting(connection, reply.greeting)
        await _mark(connection, reply.answered_ids, InboundState.ANSWERED, None)
        parts += await insert_parts(connection, reply)
        return await start_first(connection, parts) if start_sending else parts


async def _mark(
    connection: AsyncConnection, ids: Sequence[int], state: InboundState, error: str | None
) -> None:
    await connection.execute(
        update(Message)
        .where(Message.id.in_(ids), Message.status == InboundState.RECEIVED.value)
        .values(status=state.value, error=error, updated_at=utcnow())
    )
