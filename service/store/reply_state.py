"""Everything a reply job reads before it answers, in one read transaction: the conversation
(with when its person last wrote, how many reply calls it had in the rate-limit window and
whether its remote side is one of our own addresses), its claimed messages still waiting, the
parts it still owes and, when it will ask the model, the history the model is shown (with the
summary in summary memory: what `reply/memory.py` would read). Up to three statements on one
pooled connection instead of a transaction each: the per-transaction and per-statement cost,
not SQL, is what a reply job spends its CPU on. For the same reason the jobs whose state is
read at the same moment share that read transaction (`group_commit.group_read`).

The statements are built once, on the tables (not the ORM entities), with bound parameters: a
job only binds values, and SQLAlchemy finds the compiled form in its cache at once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import cast

from sqlalchemy import Table, and_, bindparam, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.conversation import StoredTurn
from service.group_commit import group_read
from service.models import AssistantCall, Conversation, Message
from service.store.conversations import ConversationView, Waiting, read_history
from service.store.memory import Summary
from service.store.outbox import UNSENT, Part, part_of, str_headers
from service.types import CallPurpose, CallStatus, InboundState, Intent, Sender, media_from_json

_T_ASSISTANTCALL = cast(Table, AssistantCall.__table__)
_T_CONVERSATION = cast(Table, Conversation.__table__)
_T_MESSAGE = cast(Table, Message.__table__)


@dataclass(frozen=True)
class HistoryWanted:
    """The history a reply in a conversation shows the model, as its assistant profile says."""

    rows: int  # stored rows to read, at most
    after_summary: bool  # summary memory: the summary, and only the rows after its watermark


@dataclass(frozen=True)
class History:
    """The summary (empty in window memory) and the earlier turns, before the waiting questions."""

    summary: Summary
    rows: list[StoredTurn]


@dataclass(frozen=True)
class ReplyState:
    """One reply job's view of its conversation, read once at its start."""

    conversation: ConversationView
    waiting: list[Waiting]  # the claimed messages still `received`, oldest first
    unsent: list[Part]  # parts still `pending` or `sending`, in the order they go out
    history: History | None = None  # read when a question waits and the model may be asked

    @property
    def replied(self) -> bool:
        """Whether the conversation is known to have an assistant message (so no greeting is
        owed): a part it still owes, or a reply in the history read."""
        rows = self.history.rows if self.history else []
        return bool(self.unsent) or any(row.sender is Sender.ASSISTANT for row in rows)


_C = _T_CONVERSATION.c
_M = _T_MESSAGE.c
_A = _T_ASSISTANTCALL.c
_OWN = _T_CONVERSATION.alias("own")

_CONVERSATION = select(
    _C.id,
    _C.channel,
    _C.remote_address,
    _C.local_address,
    _C.opted_out,
    _C.paused,
    _C.public_base_url,
    select(func.max(_M.created_at))
    .where(_M.conversation_id == _C.id, _M.sender == Sender.USER.value)
    .scalar_subquery()
    .label("last_inbound_at"),
    select(func.count())
    .where(
        _A.conversation_id == _C.id,
        # A superseded call was made and paid for: it counts (README, "Bursts").
        _A.status.in_((CallStatus.OK.value, CallStatus.SUPERSEDED.value)),
        _A.purpose == CallPurpose.REPLY.value,  # summary calls do not count against the person
        _A.created_at >= bindparam("since", type_=_A.created_at.type),
    )
    .scalar_subquery()
    .label("recent_model_calls"),
    exists()
    .where(_OWN.c.local_address == _C.remote_address)
    .label("own_address"),  # answering ourselves would be a loop
    _C.memory_summary,
    _C.memory_through_id,
).where(_C.id == bindparam("conversation_id"))

# The claimed messages still waiting and the unsent parts, in one statement.
_MESSAGES = (
    select(
        _M.id,
        _M.conversation_id,
        _M.channel,
        _M.sender,
        _M.author,
        _M.intent,
        _M.body,
        _M.part,
        _M.subject,
        _M.headers,
        _M.media,
        _M.status,
        _M.attempted_at,
    )
    .where(
        or_(
            and_(
                _M.id.in_(bindparam("message_ids", expanding=True)),
                _M.sender == Sender.USER.value,
                _M.status == InboundState.RECEIVED.value,
            ),
            and_(
                _M.conversation_id == bindparam("conversation_id"),
                _M.sender == Sender.ASSISTANT.value,
                _M.status.in_(UNSENT),
            ),
        )
    )
    .order_by(_M.id)
)


async def read_reply_state(
    engine: AsyncEngine,
    conversation_id: int,
    message_ids: Sequence[int],
    *,
    calls_since: dt.datetime,
    history: Callable[[str], HistoryWanted] | None = None,
) -> ReplyState | None:
    """None when the conversation is gone. The conversation's `recent_model_calls` counts its
    answered reply calls since `calls_since` (`REPLY_RATE_LIMIT`). `history`, from the
    conversation's local address: what history to read for its questions, if any wait. Read
    in the read transaction of the jobs whose state is read at the same time (`group_read`)."""

    async def read(connection: AsyncConnection) -> ReplyState | None:
        found = await connection.execute(
            _CONVERSATION, {"conversation_id": conversation_id, "since": calls_since}
        )
        row = found.first()
        if row is None:
            return None
        values = row._asdict()
        summary = Summary(values.pop("memory_summary"), values.pop("memory_through_id"))
        conversation = replace(ConversationView(**values), own_address=bool(row.own_address))
        waiting, unsent = await _messages(connection, conversation_id, message_ids)
        shown = None
        if history is not None and _may_ask_model(conversation, waiting):
            shown = await _history(connection, conversation, waiting, summary, history)
        return ReplyState(conversation, waiting, unsent, shown)

    return await group_read(engine).run(read)


def _may_ask_model(conversation: ConversationView, waiting: Sequence[Waiting]) -> bool:
    """Whether this job may ask the model: a question waits, and the conversation allows it."""
    blocked = conversation.opted_out or conversation.paused or conversation.own_address
    return not blocked and any(m.intent != Intent.HELP.value for m in waiting)


async def _history(
    connection: AsyncConnection,
    conversation: ConversationView,
    waiting: Sequence[Waiting],
    summary: Summary,
    wanted: Callable[[str], HistoryWanted],
) -> History:
    plan = wanted(conversation.local_address)
    questions = [m.id for m in waiting if m.intent != Intent.HELP.value]
    after_id = summary.through_id if plan.after_summary else None
    rows = await read_history(connection, conversation.id, questions, plan.rows, after_id)
    return History(summary if plan.after_summary else Summary(), rows)


async def _messages(
    connection: AsyncConnection, conversation_id: int, message_ids: Sequence[int]
) -> tuple[list[Waiting], list[Part]]:
    rows = await connection.execute(
        _MESSAGES, {"conversation_id": conversation_id, "message_ids": list(message_ids)}
    )
    waiting, unsent = [], []
    for row in rows:
        if row.sender == Sender.USER.value:
            headers, media = str_headers(row.headers), media_from_json(row.media)
            waiting.append(Waiting(row.id, row.intent, row.body, row.subject, headers, media))
        else:
            unsent.append(part_of(row))
    return waiting, unsent
