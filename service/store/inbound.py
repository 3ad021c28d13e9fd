"""Reads and writes of conversations and messages, outside the job queue.

The hot path is `InboundWriter`: webhooks hand it parsed messages and wait for the commit.
Whatever arrives while a transaction is open goes into the next one (group commit), so a burst
of concurrent webhooks costs a few transactions, not one each, while a lone webhook still
commits at once. Every request gets its 2xx only after its rows are durable.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Insert, Table, delete, exists, func, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service import storable
from service.conversation import summary_of
from service.db import begin_inline, per_dialect, utcnow
from service.group_commit import Batcher, once_more_if_dead
from service.media import history_text
from service.models import (
    Conversation,
    Message,
    new_conversation_url,
)
from service.queue.debounce import OFF, Debounce
from service.queue.manager import NewJob, enqueue
from service.store.errors import StoreUnavailable, storage_failure
from service.types import Inbound, InboundState, Intent, Sender

log = logging.getLogger(__name__)

MAX_BATCH = 256
REPORT_TTL = dt.timedelta(days=1)  # a report for a message we never stored is someone else's
ConversationKey = tuple[str, str, str]


@dataclass(frozen=True)
class Recorded:
    """What became of one inbound message."""

    conversation_id: int | None  # None for a redelivery that named a conversation never used
    message_id: int | None  # None when it was a redelivery of a stored message
    enqueued: bool  # a reply job was created

    @property
    def duplicate(self) -> bool:
        return self.message_id is None


_T_CONVERSATION = cast(Table, Conversation.__table__)
_T_MESSAGE = cast(Table, Message.__table__)


def _upsert_conversations(dialect: Any) -> Insert:
    """Find or create conversations: touch `updated_at`, keep a display name (and the URL
    the provider reached us at) once known."""
    stmt = dialect.insert(_T_CONVERSATION)
    c = _T_CONVERSATION.c
    return stmt.on_conflict_do_update(  # type: ignore[no-any-return]
        index_elements=["channel", "remote_address", "local_address"],
        set_={
            "updated_at": stmt.excluded.updated_at,
            "display_name": func.coalesce(stmt.excluded.display_name, c.display_name),
            "public_base_url": func.coalesce(stmt.excluded.public_base_url, c.public_base_url),
        },
    ).returning(c.id, c.channel, c.remote_address, c.local_address, c.opted_out, c.paused)


def _insert_new_messages(dialect: Any) -> Insert:
    """The unique (channel, provider id) constraint is the dedupe: a redelivery is skipped."""
    c = _T_MESSAGE.c
    return (  # type: ignore[no-any-return]
        dialect.insert(_T_MESSAGE)
        .on_conflict_do_nothing(index_elements=["channel", "provider_message_id"])
        .returning(c.id, c.channel, c.provider_message_id)
    )


# Built once per dialect: a batch only binds its rows (building one costs more than running it).
_UPSERT_CONVERSATIONS = per_dialect(_upsert_conversations)
_INSERT_NEW_MESSAGES = per_dialect(_insert_new_messages)


def _key(inbound: Inbound) -> ConversationKey:
    return (inbound.channel.value, inbound.remote_address, inbound.local_address)


async def upsert_conversations(
    connection: AsyncConnection, inbounds: Sequence[Inbound], now: dt.datetime
) -> dict[ConversationKey, Any]:
    """Find or create each conversation in one statement; touch `updated_at` on the found ones.
    The ones created here have `created_at == now`."""
    first_of: dict[ConversationKey, Inbound] = {}
    named: dict[ConversationKey, str | None] = {}
    reached: dict[ConversationKey, str | None] = {}
    for inbound in inbounds:
        key = _key(inbound)
        first_of.setdefault(key, inbound)
        named[key] = inbound.display_name or named.get(key)
        reached[key] = inbound.reached_at or reached.get(key)
    rows = [
        {
            "channel": key[0],
            "remote_address": key[1],
            "local_address": key[2],
            "summary": summary_of(history_text(inbound.body, inbound.media)),
            "conversation_url": new_conversation_url(),
            "opted_out": False,
            "paused": False,
            "display_name": named[key],
            "public_base_url": reached[key],
            "created_at": now,
            "updated_at": now,
        }
        for key, inbound in first_of.items()
    ]
    result = await connection.execute(_UPSERT_CONVERSATIONS[connection.dialect.name], rows)
    return {(r.channel, r.remote_address, r.local_address): r for r in result}


def _unique_by_provider_id(inbounds: Iterable[Inbound]) -> list[Inbound]:
    seen: set[tuple[str, str]] = set()
    unique = []
    for inbound in inbounds:
        key = (inbound.channel.value, inbound.provider_message_id)
        if key not in seen:
            seen.add(key)
            unique.append(inbound)
    return unique


async def insert_new_messages(
    connection: AsyncConnection,
    inbounds: Sequence[Inbound],
    conversation_ids: Sequence[int],
) -> dict[tuple[str, str], int]:
    """Insert the user's messages; the unique (channel, provider id) constraint is the dedupe,
    so a redelivery, even one racing in another process, is skipped, never doubled."""
    now = utcnow()
    rows = [
        {
            "conversation_id": conversation_id,
            "created_at": now,
            "updated_at": now,
            "channel": inbound.channel.value,
            "sender": Sender.USER.value,
            "intent": inbound.intent.value,
            "body": inbound.body,
            "provider_message_id": inbound.provider_message_id,
            "subject": inbound.subject,
            "headers": {
                **inbound.headers,
                **({"meta": inbound.meta} if inbound.meta else {}),
            }
            or None,
            "media": [item.to_json() for item in inbound.media] or None,
            "status": InboundState.RECEIVED.value,
        }
        for inbound, conversation_id in zip(inbounds, conversation_ids, strict=True)
    ]
    result = await connection.execute(_INSERT_NEW_MESSAGES[connection.dialect.name], rows)
    return {(r.channel, r.provider_message_id): r.id for r in result}


def _answerable(inbound: Inbound) -> bool:
    return inbound.intent in (Intent.MESSAGE, Intent.HELP)


async def record_inbound(
    connection: AsyncConnection, inbounds: Sequence[Inbound], debounce: Debounce = OFF
) -> list[Recorded]:
    """Store a batch of inbound messages and enqueue their replies, inside the caller's
    transaction: conversation upsert, message insert, job insert, plus the rare state changes
    (opt-out keywords, messages that arrive while opted out or paused)."""
    started = utcnow()
    conversations = await upsert_conversations(connection, inbounds, started)
    unique = _unique_by_provider_id(inbounds)
    new_ids = await insert_new_messages(
        connection, unique, [conversations[_key(i)].id for i in unique]
    )
    if len(new_ids) < len(inbounds):
        dropped = await _drop_unused_conversations(
            connection, conversations, unique, new_ids, started
        )
        for key in dropped:
            del conversations[key]
    opted_out = {key: bool(row.opted_out) for key, row in conversations.items()}
    jobs, not_answered = _route(unique, new_ids, conversations, opted_out)
    await _apply_opt_changes(connection, conversations, opted_out)
    if not_answered:
        await connection.execute(
            update(Message)
            .where(Message.id.in_(not_answered))
            .values(status=InboundState.NOT_ANSWERED.value)
        )
    await enqueue(connection, jobs, debounce)
    enqueued = {job.message_id for job in jobs}
    results = []
    for inbound in inbounds:
        message_id = new_ids.pop((inbound.channel.value, inbound.provider_message_id), None)
        conversation = conversations.get(_key(inbound))
        results.append(
            Recorded(conversation and conversation.id, message_id, message_id in enqueued)
        )
    return results


def _route(
    inbounds: Sequence[Inbound],
    new_ids: dict[tuple[str, str], int],
    conversations: dict[ConversationKey, Any],
    opted_out: dict[ConversationKey, bool],
) -> tuple[list[NewJob], list[int]]:
    """(the jobs to enqueue, the new messages not to answer), in arrival order: STOP then "hi"
    leaves "hi" unanswered. Updates `opted_out` with the batch's keywords."""
    jobs: list[NewJob] = []
    not_answered: list[int] = []
    for inbound in inbounds:
        message_id = new_ids.get((inbound.channel.value, inbound.provider_message_id))
        if message_id is None:
            continue
        key = _key(inbound)
        if inbound.intent in (Intent.OPT_OUT, Intent.OPT_IN):
            opted_out[key] = inbound.intent is Intent.OPT_OUT
        if not _answerable(inbound) or opted_out[key] or conversations[key].paused:
            not_answered.append(message_id)
        else:
            quiet = inbound.intent is Intent.MESSAGE  # HELP's fixed text is not debounced
            jobs.append(NewJob(conversations[key].id, message_id, waits_for_quiet=quiet))
    return jobs, not_answered


async def _drop_unused_conversations(
    connection: AsyncConnection,
    conversations: dict[ConversationKey, Any],
    inbounds: Sequence[Inbound],
    new_ids: dict[tuple[str, str], int],
    created_at: dt.datetime,
) -> list[ConversationKey]:
    """Delete the conversations this transaction created that got no message (a redelivery
    naming another From or To), so a duplicate never leaves an empty conversation behind.
    Called only for batches with a duplicate: the common path pays nothing. Returns their keys."""
    used = {_key(i) for i in inbounds if (i.channel.value, i.provider_message_id) in new_ids}
    unused = {key: row.id for key, row in conversations.items() if key not in used}
    if not unused:
        return []
    result = await connection.execute(
        delete(Conversation)
        .where(
            Conversation.id.in_(unused.values()),
            Conversation.created_at == created_at,  # created by this transaction, not found
            ~exists().where(Message.conversation_id == Conversation.id),
        )
        .returning(Conversation.id)
    )
    dropped = set(result.scalars())
    return [key for key, conversation_id in unused.items() if conversation_id in dropped]


async def _apply_opt_changes(
    connection: AsyncConnection,
    conversations: dict[ConversationKey, Any],
    opted_out: dict[ConversationKey, bool],
) -> None:
    for key, row in conversations.items():
        if bool(row.opted_out) != opted_out[key]:
            await connection.execute(
                update(Conversation)
                .where(Conversation.id == row.id)
                .values(opted_out=opted_out[key], updated_at=utcnow())
            )
            log.info(
                "conversation %s %s",
                row.id,
                "opted out" if opted_out[key] else "opted back in",
            )


class InboundWriter:
    """Group commit for webhooks: one transaction per batch of arrivals (`group_commit.Batcher`),
    the batch's messages stored by one `record_inbound`."""

    def __init__(
        self,
        engine: AsyncEngine,
        on_commit: Callable[[set[int] | None], None] = lambda _conversations: None,
        debounce: Debounce = OFF,
    ) -> None:
        self._engine = engine
        self._on_commit = on_commit
        self._debounce = debounce  # when the replies to a burst are due (SPEC §12)
        self._batches: Batcher[Inbound, Recorded] = Batcher(
            self._write,
            name="parley-inbound-writer",
            max_batch=MAX_BATCH,
            # A database that is away blames no row: fail them all now, not one by one.
            alone_may_help=lambda exc: not isinstance(storage_failure(exc), StoreUnavailable),
            failure=_failure,
        )
        self._started = False

    def start(self) -> None:
        self._started = True

    async def stop(self) -> None:
        """Finish what was handed in, then stop."""
        await self._batches.drained()
        self._started = False

    async def record(self, inbound: Inbound) -> Recorded:
        """Store one message once its batch commits. Every channel's message is made storable
        here, before it can join a batch (`storable.Unstorable` when it cannot be); the
        database's own refusal is `StoreRefused`, and its absence `StoreUnavailable`. A client
        hanging up does not undo the write."""
        if not self._started:
            raise RuntimeError("InboundWriter.start() was not called")
        return await self._batches.submit(storable.inbound(inbound))

    async def _write(self, inbounds: list[Inbound]) -> list[Recorded]:
        results = await self._commit(inbounds)
        enqueued = {r.conversation_id for r in results if r.enqueued and r.conversation_id}
        if enqueued:
            # The conversations given a job, due now: the worker's hints. Under a quiet time
            # (SPEC §12) some are due now (HELP ends the wait), most later: the worker reads
            # the queue instead (None), which also tells it when the next one falls due.
            self._on_commit(None if self._debounce.on else enqueued)
        return results

    async def _commit(self, inbounds: list[Inbound]) -> list[Recorded]:
        """One transaction for the batch (`once_more_if_dead`: a retried batch is safe, its
        messages deduplicate on their provider ids)."""
        return await once_more_if_dead(lambda: self._transaction(inbounds))

    async def _transaction(self, inbounds: list[Inbound]) -> list[Recorded]:
        async with begin_inline(self._engine) as connection:
            return await record_inbound(connection, inbounds, self._debounce)


def _failure(exc: Exception) -> BaseException:
    """What a caller whose batch failed sees: the `StorageFailure` the exception means, or,
    not the database's doing, the exception itself (a bug, logged with its traceback)."""
    failure = storage_failure(exc)
    if failure is None:
        log.error("storing inbound message failed", exc_info=exc)
    return failure or exc
