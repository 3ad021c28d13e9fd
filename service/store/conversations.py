"""What the operator reads and changes: the queries behind `/api/…`, `/c/…` and the
`parley conversations` / `parley forget` commands, so the web and the command line share them.

Deletes rely on the database's `ON DELETE CASCADE` (messages, assistant calls, jobs); the counts
reported are taken inside the deleting transaction, after the conversations are locked.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, case, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.conversation import StoredTurn
from service.db import reader, session_factory, utcnow
from service.models import AssistantCall, Conversation, Message
from service.queue.manager import NewJob, count_jobs, enqueue
from service.store.outbox import Answer, insert_parts, str_headers
from service.types import (
    Author,
    Delivery,
    InboundState,
    Intent,
    MediaItem,
    Sender,
    media_from_json,
)

MAX_PAGE_SIZE = 100
TOKEN_MAX_CHARS = 64  # `conversation.conversation_url` is a String(64)
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # `secrets.token_urlsafe`'s alphabet


class NotFound(Exception):
    """No conversation with that id (or token)."""


class OptedOut(Exception):
    """The person opted out: nothing may be sent to them."""


@dataclass(frozen=True)
class Overview:
    """One conversation as listed: the row and its message counts."""

    conversation: Conversation
    user_messages: int
    assistant_messages: int

    @property
    def message_count(self) -> int:
        return self.user_messages + self.assistant_messages


@dataclass(frozen=True)
class Page:
    items: list[Overview]
    total: int


@dataclass(frozen=True)
class Detail:
    conversation: Conversation
    messages: list[Message]
    calls: list[AssistantCall]


@dataclass(frozen=True)
class Deleted:
    conversations: int = 0
    messages: int = 0
    assistant_calls: int = 0
    jobs: int = 0

    def __str__(self) -> str:
        return (
            f"{self.conversations} conversation(s), {self.messages} message(s), "
            f"{self.assistant_calls} assistant call record(s), {self.jobs} job(s)"
        )


@dataclass(frozen=True)
class ConversationView:
    """What the reply flow reads of a conversation."""

    id: int
    channel: str
    remote_address: str
    local_address: str
    opted_out: bool
    paused: bool
    last_inbound_at: dt.datetime | None = None  # the person's latest message
    public_base_url: str | None = None  # where its provider reached us (no PUBLIC_BASE_URL)
    # Read with the job's state (`reply_state.read_reply_state`), for the limits and loops:
    recent_model_calls: int = 0  # reply calls, ok or superseded, in the rate limit window
    own_address: bool = False  # the remote side is one of our own addresses


@dataclass(frozen=True)
class Waiting:
    """A user's message still waiting for its answer."""

    id: int
    intent: str
    body: str
    subject: str | None
    headers: dict[str, str]
    media: tuple[MediaItem, ...] = ()  # its attachments, as stored (no bytes)


@dataclass(frozen=True)
class ReplyTo:
    """An inbound message's state and the parts of the reply that answered it."""

    status: str
    error: str | None
    parts: list[str]
    subject: str | None = None
    part_status: str | None = None


def transcript_url(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/c/{token}"


# ---------------------------------------------------------------- reading


async def list_conversations(engine: AsyncEngine, page: int, page_size: int) -> Page:
    """Newest activity first; `page` starts at 1."""
    counts = (
        select(
            Message.conversation_id,
            func.sum(case((Message.sender == Sender.USER.value, 1), else_=0)).label("users"),
            func.sum(case((Message.sender == Sender.ASSISTANT.value, 1), else_=0)).label("ours"),
        )
        .group_by(Message.conversation_id)
        .subquery()
    )
    query = (
        select(Conversation, counts.c.users, counts.c.ours)
        .outerjoin(counts, counts.c.conversation_id == Conversation.id)
        .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
        .limit(page_size)
        .offset((page - 1) * page_size)
    )
    async with session_factory(reader(engine))() as session:
        total = int(await session.scalar(select(func.count()).select_from(Conversation)) or 0)
        rows = (await session.execute(query)).all()
    return Page(
        [Overview(row[0], int(row[1] or 0), int(row[2] or 0)) for row in rows],
        total,
    )


async def conversation_detail(engine: AsyncEngine, conversation_id: int) -> Detail:
    """The conversation with its messages and assistant calls, oldest first."""
    async with session_factory(reader(engine))() as session:
        conversation = await session.get(Conversation, conversation_id)
        if conversation is None:
            raise NotFound(conversation_id)
        messages = list(
            await session.scalars(
                select(Message)
                .where(Message.conversation_id == conversation_id)
                .order_by(Message.id)
            )
        )
        calls = list(
            await session.scalars(
                select(AssistantCall)
                .where(AssistantCall.conversation_id == conversation_id)
                .order_by(AssistantCall.id)
            )
        )
    return Detail(conversation, messages, calls)


async def transcript(engine: AsyncEngine, token: str) -> Detail:
    """The conversation behind a transcript link. Looked up by its (unique, indexed) token, then
    compared in constant time, so an unknown token and a nearly right one fail alike."""
    if not _TOKEN.fullmatch(token):  # not one we could have made: no need to ask the database
        raise NotFound(token)
    async with reader(engine).connect() as connection:
        row = (
            await connection.execute(
                select(Conversation.id, Conversation.conversation_url).where(
                    Conversation.conversation_url == token
                )
            )
        ).first()
    given = token.encode("utf-8")
    if row is None or not secrets.compare_digest(row.conversation_url.encode("utf-8"), given):
        raise NotFound(token)
    return await conversation_detail(engine, row.id)


# ---------------------------------------------------------------- the reply flow's reads


async def find_conversation(engine: AsyncEngine, conversation_id: int) -> ConversationView | None:
    async with reader(engine).connect() as connection:
        row = (
            await connection.execute(
                select(
                    Conversation.id,
                    Conversation.channel,
                    Conversation.remote_address,
                    Conversation.local_address,
                    Conversation.opted_out,
                    Conversation.paused,
                    last_inbound_at(),
                ).where(Conversation.id == conversation_id)
            )
        ).first()
    return None if row is None else ConversationView(**row._asdict())


def last_inbound_at() -> Any:
    """When the conversation's person last wrote (WhatsApp's 24-hour window runs from it)."""
    return (
        select(func.max(Message.created_at))
        .where(Message.conversation_id == Conversation.id, Message.sender == Sender.USER.value)
        .scalar_subquery()
        .label("last_inbound_at")
    )


async def waiting_messages(engine: AsyncEngine, message_ids: Sequence[int]) -> list[Waiting]:
    """The user's messages among these that are still `received`, oldest first."""
    async with reader(engine).connect() as connection:
        rows = await connection.execute(
            select(
                Message.id,
                Message.intent,
                Message.body,
                Message.subject,
                Message.headers,
                Message.media,
            )
            .where(
                Message.id.in_(message_ids),
                Message.sender == Sender.USER.value,
                Message.status == InboundState.RECEIVED.value,
            )
            .order_by(Message.id)
        )
        return [
            Waiting(
                **{
                    **row._asdict(),
                    "headers": str_headers(row.headers),
                    "media": media_from_json(row.media),
                }
            )
            for row in rows
        ]


_H = cast(Table, Message.__table__).c
# The history statement, built once: a job only binds its values.
_HISTORY = (
    select(_H.id, _H.sender, _H.body, _H.reply_to_id, _H.media)
    .where(
        _H.conversation_id == bindparam("conversation_id"),
        _H.id.not_in(bindparam("new_ids", expanding=True)),
        _H.id > bindparam("after_id"),
        or_(
            and_(
                _H.sender == Sender.USER.value,
                _H.intent == Intent.MESSAGE.value,
                _H.id < bindparam("newest_id"),
            ),
            and_(
                _H.sender == Sender.ASSISTANT.value,
                _H.author.in_([Author.MODEL.value, Author.OPERATOR.value]),
                _H.status != Delivery.FAILED.value,
            ),
        ),
    )
    .order_by(_H.id.desc())
    .limit(bindparam("max_rows"))
)


async def history_rows(
    engine: AsyncEngine,
    conversation_id: int,
    new_ids: Sequence[int],
    max_rows: int,
    after_id: int | None = None,
) -> list[StoredTurn]:
    """`read_history` in a read transaction of its own."""
    if max_rows == 0:
        return []
    async with reader(engine).connect() as connection:
        return await read_history(connection, conversation_id, new_ids, max_rows, after_id)


async def read_history(
    connection: AsyncConnection,
    conversation_id: int,
    new_ids: Sequence[int],
    max_rows: int,
    after_id: int | None = None,
) -> list[StoredTurn]:
    """The newest `max_rows` stored turns before the new messages, oldest first: the user's
    messages (not keywords) and the replies written by the model or an operator, one row per
    part. A reply stored after a new message arrived (a burst) is still history, so it counts
    by id but the new messages themselves do not. `conversation.bounded_history` trims them.
    `after_id`: only rows after it (a summary covers the rest)."""
    if max_rows == 0:
        return []
    rows = await connection.execute(
        _HISTORY,
        {
            "conversation_id": conversation_id,
            "new_ids": list(new_ids),
            "after_id": after_id or 0,
            "newest_id": max(new_ids),
            "max_rows": max_rows,
        },
    )
    return [
        StoredTurn(Sender(r.sender), r.body, r.reply_to_id, r.id, media_from_json(r.media))
        for r in reversed(rows.all())
    ]


async def is_stored(engine: AsyncEngine, channel: str, provider_message_id: str) -> bool:
    """Whether this provider message is stored already: a webhook checks before any costly
    parsing, so a redelivery costs one indexed read (the insert still dedupes races)."""
    async with reader(engine).connect() as connection:
        found = await connection.scalar(
            select(Message.id)
            .where(Message.channel == channel, Message.provider_message_id == provider_message_id)
            .limit(1)
        )
    return found is not None


async def recent_replies(
    engine: AsyncEngine, channel: str, remote_address: str, local_address: str, limit: int = 5
) -> list[str]:
    """Parley's latest replies in this conversation, newest first: what a person's answer
    usually quotes back, so the text extraction can remove those quotes wherever they sit."""
    async with reader(engine).connect() as connection:
        result = await connection.scalars(
            select(Message.body)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(
                Conversation.channel == channel,
                Conversation.remote_address == remote_address,
                Conversation.local_address == local_address,
                Message.sender == Sender.ASSISTANT.value,
            )
            .order_by(Message.id.desc())
            .limit(limit)
        )
        return list(result)


async def reply_to(engine: AsyncEngine, channel: str, provider_message_id: str) -> ReplyTo | None:
    """What became of one inbound message (`parley sms` waits on it); None while unknown."""
    async with reader(engine).connect() as connection:
        inbound = (
            await connection.execute(
                select(Message.id, Message.conversation_id, Message.status, Message.error).where(
                    Message.channel == channel,
                    Message.provider_message_id == provider_message_id,
                )
            )
        ).first()
        if inbound is None:
            return None
        parts = (
            await connection.execute(
                select(Message.body, Message.subject, Message.status, Message.reply_to_id)
                .where(
                    Message.conversation_id == inbound.conversation_id,
                    Message.sender == Sender.ASSISTANT.value,
                    Message.reply_to_id >= inbound.id,
                )
                .order_by(Message.id)
            )
        ).all()
    if not parts:
        return ReplyTo(inbound.status, inbound.error, [])
    first = parts[0]
    bodies = [p.body for p in parts if p.reply_to_id == first.reply_to_id]
    return ReplyTo(inbound.status, inbound.error, bodies, first.subject, first.status)


# ---------------------------------------------------------------- changing


async def set_paused(engine: AsyncEngine, conversation_id: int, paused: bool) -> None:
    """Human handoff: while paused the assistant stores and shows messages but never answers."""
    async with engine.begin() as connection:
        result = await connection.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id)
            .values(paused=paused, updated_at=utcnow())
        )
    if not result.rowcount:
        raise NotFound(conversation_id)


async def add_operator_message(
    engine: AsyncEngine,
    conversation_id: int,
    body: str,
    envelope: tuple[str | None, dict[str, str]],
    split: Callable[[str], list[str]],
) -> list[int]:
    """Store a human reply as pending `assistant` parts written by the operator, with a reply
    job, in one transaction: the worker sends it through the same durable, retried path as any
    reply (paused or not). `envelope` is the channel's subject and threading headers, `split`
    its rule for the parts (`ChannelPlugin.split`).
    Returns the stored parts' ids."""
    subject, headers = envelope
    now = utcnow()
    async with engine.begin() as connection:
        conversation = (
            await connection.execute(
                select(Conversation.channel, Conversation.opted_out)
                .where(Conversation.id == conversation_id)
                .with_for_update()
            )
        ).first()
        if conversation is None:
            raise NotFound(conversation_id)
        if conversation.opted_out:
            raise OptedOut(conversation_id)
        reply = Answer(
            conversation_id=conversation_id,
            channel=conversation.channel,
            answered_ids=(),
            parts=split(body),
            author=Author.OPERATOR,
            subject=subject,
            headers=headers,
        )
        ids = [part.id for part in await insert_parts(connection, reply)]
        await connection.execute(
            update(Conversation).where(Conversation.id == conversation_id).values(updated_at=now)
        )
        await enqueue(connection, [NewJob(conversation_id, ids[0])])
    return ids


async def get_conversation(engine: AsyncEngine, conversation_id: int) -> Conversation:
    async with session_factory(reader(engine))() as session:
        conversation = await session.get(Conversation, conversation_id)
    if conversation is None:
        raise NotFound(conversation_id)
    return conversation


async def last_inbound(engine: AsyncEngine, conversation_id: int) -> Message | None:
    """The person's latest message: what an operator's email reply threads under."""
    async with session_factory(reader(engine))() as session:
        return await session.scalar(
            select(Message)
            .where(
                Message.conversation_id == conversation_id,
                Message.sender == Sender.USER.value,
            )
            .order_by(Message.id.desc())
            .limit(1)
        )


async def delete_conversation(engine: AsyncEngine, conversation_id: int) -> Deleted:
    async with engine.begin() as connection:
        ids = (
            await connection.execute(
                select(Conversation.id).where(Conversation.id == conversation_id).with_for_update()
            )
        ).scalars()
        deleted = await _delete(connection, list(ids))
    if not deleted.conversations:
        raise NotFound(conversation_id)
    return deleted


async def count_address(engine: AsyncEngine, address: str) -> Deleted:
    """What `forget(address)` would delete, for the confirmation question."""
    async with reader(engine).connect() as connection:
        ids = await _ids_of(connection, address, lock=False)
        return await _counts(connection, ids)


async def forget(engine: AsyncEngine, address: str) -> Deleted:
    """Delete every conversation of that (normalised) remote address, cascading."""
    async with engine.begin() as connection:
        ids = await _ids_of(connection, address, lock=True)
        return await _delete(connection, ids)


async def _ids_of(connection: AsyncConnection, address: str, *, lock: bool) -> list[int]:
    query = select(Conversation.id).where(Conversation.remote_address == address)
    if lock:  # an inbound message for this person waits until the delete commits
        query = query.with_for_update()
    return list((await connection.execute(query.order_by(Conversation.id))).scalars())


async def _counts(connection: AsyncConnection, ids: Sequence[int]) -> Deleted:
    if not ids:
        return Deleted()

    async def count(model: type[Message] | type[AssistantCall]) -> int:
        result = await connection.execute(
            select(func.count()).select_from(model).where(model.conversation_id.in_(ids))
        )
        return int(result.scalar_one())

    return Deleted(
        len(ids),
        await count(Message),
        await count(AssistantCall),
        await count_jobs(connection, ids),
    )


async def _delete(connection: AsyncConnection, ids: Sequence[int]) -> Deleted:
    if not ids:
        return Deleted()
    counted = await _counts(connection, ids)
    result = await connection.execute(delete(Conversation).where(Conversation.id.in_(ids)))
    return Deleted(
        int(result.rowcount),
        counted.messages,
        counted.assistant_calls,
        counted.jobs,
    )


def age(moment: dt.datetime, now: dt.datetime | None = None) -> str:
    """How long ago, for people reading a table: "3 min ago"."""
    seconds = int(((now or utcnow()) - moment).total_seconds())
    if seconds < 60:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return "just now"
