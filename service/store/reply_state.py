"""Everything a reply job reads, in one read transaction: the conversation (with when its person
last wrote, how many model calls it had in the rate-limit window and whether its remote side is
one of our own addresses), its claimed messages still waiting, the parts it still owes, and the
history the model is shown. Three statements on one pooled connection instead of a transaction
each: the per-transaction and per-statement cost, not SQL, is what a reply job spends its CPU on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Select, and_, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.orm import aliased

from service.conversation import StoredTurn
from service.db import reader
from service.models import AssistantCall, Conversation, Message
from service.store.conversations import (
    ConversationView,
    Waiting,
    history_query,
    last_inbound_at,
)
from service.store.outbox import UNSENT, Part, part_of, str_headers
from service.types import InboundState, Intent, Sender


@dataclass(frozen=True)
class ReplyState:
    """One reply job's view of its conversation, read once at its start."""

    conversation: ConversationView
    waiting: list[Waiting]  # the claimed messages still `received`, oldest first
    unsent: list[Part]  # parts still `pending` or `sending`, in the order they go out


async def read_reply_state(
    engine: AsyncEngine,
    conversation_id: int,
    message_ids: Sequence[int],
    *,
    history_rows: int,
    calls_since: dt.datetime,
) -> ReplyState | None:
    """None when the conversation is gone. The conversation's `history` holds up to
    `history_rows` stored turns before the waiting messages, `recent_model_calls` its answered
    model calls since `calls_since` (`REPLY_RATE_LIMIT`)."""
    async with reader(engine).connect() as connection:
        row = (await connection.execute(_conversation(conversation_id, calls_since))).first()
        if row is None:
            return None
        waiting, unsent = await _messages(connection, conversation_id, message_ids)
        questions = [m.id for m in waiting if m.intent != Intent.HELP.value]
        history = await _history(connection, conversation_id, questions, history_rows)
    conversation = replace(ConversationView(**row._asdict()), history=tuple(history))
    return ReplyState(conversation, waiting, unsent)


def _conversation(conversation_id: int, calls_since: dt.datetime) -> Select[Any]:
    own = aliased(Conversation)
    return select(
        Conversation.id,
        Conversation.channel,
        Conversation.remote_address,
        Conversation.local_address,
        Conversation.opted_out,
        Conversation.paused,
        last_inbound_at(),
        select(func.count())
        .select_from(AssistantCall)
        .where(
            AssistantCall.conversation_id == Conversation.id,
            AssistantCall.status == "ok",
            AssistantCall.created_at >= calls_since,
        )
        .scalar_subquery()
        .label("recent_model_calls"),
        exists()
        .where(own.local_address == Conversation.remote_address)
        .label("own_address"),  # answering ourselves would be a loop
    ).where(Conversation.id == conversation_id)


async def _messages(
    connection: AsyncConnection, conversation_id: int, message_ids: Sequence[int]
) -> tuple[list[Waiting], list[Part]]:
    """The claimed messages still waiting and the unsent parts, in one statement."""
    waiting_rule = and_(
        Message.id.in_(message_ids),
        Message.sender == Sender.USER.value,
        Message.status == InboundState.RECEIVED.value,
    )
    unsent_rule = and_(
        Message.conversation_id == conversation_id,
        Message.sender == Sender.ASSISTANT.value,
        Message.status.in_(UNSENT),
    )
    rows = await connection.execute(
        select(
            Message.id,
            Message.conversation_id,
            Message.channel,
            Message.sender,
            Message.author,
            Message.intent,
            Message.body,
            Message.subject,
            Message.headers,
            Message.status,
            Message.attempted_at,
        )
        .where(or_(waiting_rule, unsent_rule))
        .order_by(Message.id)
    )
    waiting, unsent = [], []
    for row in rows:
        if row.sender == Sender.USER.value:
            headers = str_headers(row.headers)
            waiting.append(Waiting(row.id, row.intent, row.body, row.subject, headers))
        else:
            unsent.append(part_of(row))
    return waiting, unsent


async def _history(
    connection: AsyncConnection, conversation_id: int, new_ids: Sequence[int], max_rows: int
) -> list[StoredTurn]:
    if max_rows == 0 or not new_ids:
        return []
    rows = await connection.execute(history_query(conversation_id, new_ids, max_rows))
    return [StoredTurn(Sender(r.sender), r.body, r.reply_to_id) for r in reversed(rows.all())]
