"""A conversation's summary memory (SPEC §12): the rolling summary and its watermark, the id of
the last message it covers. It lives on the conversation row, so deleting the conversation
(`DELETE /api/…`, `parley forget`) deletes it too."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import reader
from service.models import Conversation
from service.store.outbox import CallRecord, insert_call


@dataclass(frozen=True)
class Summary:
    text: str | None = None
    through_id: int | None = None


async def read_summary(engine: AsyncEngine, conversation_id: int) -> Summary:
    async with reader(engine).connect() as connection:
        row = (
            await connection.execute(
                select(Conversation.memory_summary, Conversation.memory_through_id).where(
                    Conversation.id == conversation_id
                )
            )
        ).first()
    return Summary() if row is None else Summary(row.memory_summary, row.memory_through_id)


async def save_summary(
    engine: AsyncEngine, conversation_id: int, summary: Summary, call: CallRecord | None = None
) -> bool:
    """Store a newer summary; a watermark never moves back (a stalled worker's older fold
    loses). The record of the call that wrote it (`call`) is stored in the same transaction,
    kept either way. True when the summary was stored."""
    async with engine.begin() as connection:
        if call is not None:
            await insert_call(connection, call)
        result = await connection.execute(
            update(Conversation)
            .where(
                Conversation.id == conversation_id,
                or_(
                    Conversation.memory_through_id.is_(None),
                    Conversation.memory_through_id < summary.through_id,
                ),
            )
            .values(memory_summary=summary.text, memory_through_id=summary.through_id)
        )
    return bool(result.rowcount)
