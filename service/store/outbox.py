"""Reply parts, from stored answer to delivery report: store an answer with its assistant-call
record, the `pending -> sending` compare-and-set, record a send (merged with a delivery report
that came first), apply delivery callbacks, fail what can no longer be sent.

Each function is one short unit of work of its own (it takes the `AsyncEngine`), committed
before it returns, so the reply flow records every step before it takes the next. The reply
job's writes (storing an answer, a send's record, the compare-and-sets, a call's record,
`mark_inbound`) are units of the engine's group commit (`service/group_commit.py`): they share
a transaction with the other jobs' writes of the moment, and a unit that raises (such as
"answered elsewhere", whose writes must be undone) is run again alone, so it fails as if it had
never been batched. The cold paths (failing unsent parts, delivery callbacks) keep their own
transactions. Steps that follow each other with nothing outside the database in between share
a unit: the answer, its model-call record and the first part's compare-and-set; a send's
record and the next part's compare-and-set, or, after the last part, the job's end.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service import storable
from service.db import reader, utcnow
from service.group_commit import group_commit
from service.models import AssistantCall, Conversation, DeliveryReport, Message
from service.queue.manager import Claim, close_taken_over, finish_jobs
from service.store import bursts
from service.store.errors import storage_errors
from service.types import DELIVERY_RANK, Author, CallStatus, Delivery, InboundState, Intent, Sender

_T_ASSISTANTCALL = cast(Table, AssistantCall.__table__)
_T_CONVERSATION = cast(Table, Conversation.__table__)
_T_DELIVERYREPORT = cast(Table, DeliveryReport.__table__)
_T_MESSAGE = cast(Table, Message.__table__)

REPORT_TTL = dt.timedelta(days=1)  # a report for a message we never stored is someone else's
UNSENT = (Delivery.PENDING.value, Delivery.SENDING.value)

# The reply job's statements, built once on the tables with bound parameters (a job only binds
# values; SQLAlchemy finds the compiled form in its cache at once).
_M = _T_MESSAGE.c
_C = _T_CONVERSATION.c
_R = _T_DELIVERYREPORT.c
_INSERT_PART = insert(_T_MESSAGE).returning(_M.id)
_A = _T_ASSISTANTCALL.c
_INSERT_CALL = insert(_T_ASSISTANTCALL).returning(_A.id)
_LINK_CALL = (
    update(_T_ASSISTANTCALL)
    .where(_A.id == bindparam("call_id"))
    .values(message_id=bindparam("first_id"))
)
_ANY_REPLY = (
    select(_M.id)
    .where(
        _M.conversation_id == bindparam("conversation_id"),
        _M.sender == Sender.ASSISTANT.value,
    )
    .limit(1)
)
_MARK_ANSWERED = (
    update(_T_MESSAGE)
    .where(
        _M.id.in_(bindparam("answered_ids", expanding=True)),
        _M.status == InboundState.RECEIVED.value,
    )
    .values(status=InboundState.ANSWERED.value, updated_at=bindparam("now"))
)


def _start_sending_statement(model_only: bool) -> Any:
    """`pending -> sending` while sendable: not opted out; for the model's replies, not paused."""
    sendable = select(_C.id).where(_C.id == bindparam("sendable_id"), _C.opted_out.is_(False))
    if model_only:
        sendable = sendable.where(_C.paused.is_(False))
    return (
        update(_T_MESSAGE)
        .where(
            _M.id == bindparam("part_id"),
            _M.status == Delivery.PENDING.value,
            _M.conversation_id.in_(sendable),
        )
        .values(
            status=Delivery.SENDING.value,
            attempted_at=bindparam("now"),
            updated_at=bindparam("now"),
        )
    )


_START_SENDING = {True: _start_sending_statement(True), False: _start_sending_statement(False)}
_TAKE_REPORTS = (
    delete(_T_DELIVERYREPORT)
    .where(_R.channel == bindparam("channel"), _R.provider_message_id == bindparam("sid"))
    .returning(_R.status, _R.error)
)
_MARK_SENT = (
    update(_T_MESSAGE)
    .where(_M.id == bindparam("part_id"))
    .values(
        status=bindparam("new_status"),
        provider_message_id=bindparam("sid"),
        error=func.coalesce(bindparam("new_error", type_=_M.error.type), _M.error),
        updated_at=bindparam("now"),
    )
)
_SET_STATUS = (
    update(_T_MESSAGE)
    .where(_M.id == bindparam("part_id"))
    .values(status=bindparam("new_status"), updated_at=bindparam("now"))
)
_SET_STATUS_NOTED = _SET_STATUS.values(error=bindparam("note"))  # ... and why, for the transcript


@dataclass(frozen=True)
class Part:
    """One stored part of a reply that is still to go out."""

    id: int
    conversation_id: int
    channel: str
    author: str | None
    body: str
    subject: str | None
    headers: dict[str, str]
    status: str
    attempted_at: dt.datetime | None
    held: bool = False  # this job won its compare-and-set: send it, no lookup first
    number: int = 1  # which part of its reply, from 1 (`Message.part`)


@dataclass(frozen=True)
class Answer:
    """A reply to store: its parts (already cut to the channel), what it answers, its envelope."""

    conversation_id: int
    channel: str
    answered_ids: Sequence[int]
    parts: Sequence[str]
    author: Author
    subject: str | None
    headers: dict[str, str]
    call_id: int | None = None
    fixed_kind: str | None = None  # which fixed text (`types.FixedText`), for author `fixed`
    # SPEC §12: not stored when a newer message of the person waits (`bursts.interrupted`).
    interruptible: bool = False
    # The newer messages among `answered_ids` a running claim took over: their queued jobs
    # close with this answer.
    taken_over: Sequence[int] = ()
    # Stored in the answer's transaction: the model call that wrote it (its record), the
    # profile's greeting (before it, when the conversation has no assistant message yet) and
    # the first part's `pending -> sending` compare-and-set.
    call: CallRecord | None = None
    greeting: Answer | None = None
    start_sending: bool = False


class Stored(enum.Enum):
    """What `store_answer` did."""

    STORED = "stored"
    ANSWERED_ELSEWHERE = "answered elsewhere"  # another worker answered them (a lost claim)
    INTERRUPTED = "interrupted"  # a newer message waits: nothing stored, the call superseded


@dataclass(frozen=True)
class StoredReply:
    """What `store_reply` did, and the parts it stored in the order they go out (the greeting's
    first); the first one `held` when `start_sending` won its compare-and-set."""

    outcome: Stored
    parts: list[Part] = field(default_factory=list)


@dataclass(frozen=True)
class CallRecord:
    """One model call as `assistant_call` keeps it, answered or failed."""

    conversation_id: int
    model: str
    generation_params: dict[str, Any]
    processing_time: int
    ok: bool
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    error: str | None = None
    purpose: str = "reply"  # `types.CallPurpose`
    created_at: dt.datetime = field(default_factory=utcnow)  # when the call returned


def str_headers(headers: dict[str, Any] | None) -> dict[str, str]:
    return {k: v for k, v in (headers or {}).items() if isinstance(v, str)}


# ---------------------------------------------------------------- storing an answer


async def record_call(engine: AsyncEngine, call: CallRecord) -> int:
    """Store a model call's record (a failed one, or one whose answer was not stored)."""
    return await group_commit(engine).run(functools.partial(insert_call, call=call))


async def insert_call(
    connection: AsyncConnection,
    call: CallRecord,
    *,
    status: CallStatus | None = None,
    message_id: int | None = None,
) -> int:
    """Insert a model call's record in the caller's transaction; returns its id."""
    result = await connection.execute(
        _INSERT_CALL,
        {
            "conversation_id": call.conversation_id,
            "message_id": message_id,
            "model": call.model,
            "purpose": call.purpose,
            "generation_params": call.generation_params,
            "processing_time": call.processing_time,
            "status": (status or (CallStatus.OK if call.ok else CallStatus.ERROR)).value,
            "prompt_tokens": call.prompt_tokens,
            "completion_tokens": call.completion_tokens,
            "total_tokens": call.total_tokens,
            "error": call.error,
            "created_at": call.created_at,
        },
    )
    return int(result.scalar_one())


async def store_answer(engine: AsyncEngine, answer: Answer) -> Stored:
    """`store_reply`, for callers that only need to know what it did."""
    return (await store_reply(engine, answer)).outcome


async def store_reply(engine: AsyncEngine, answer: Answer) -> StoredReply:
    """The reply's parts and the answered messages' new state, in one transaction, with the
    model call's record (`answer.call`), the greeting when owed and the first part's
    compare-and-set. Nothing is stored when the messages were no longer waiting (another worker
    answered them while this one was stalled past its lease; the call is then recorded on its
    own), nor when an interruptible answer finds a newer message (its call recorded
    `superseded`, in the same transaction)."""
    try:
        return await group_commit(engine).run(functools.partial(_store_reply, answer=answer))
    except _AnsweredElsewhere:  # its unit ran alone, and its writes were rolled back
        if answer.call is not None:
            await record_call(engine, answer.call)  # the call was made: it stays on record
        return StoredReply(Stored.ANSWERED_ELSEWHERE)


async def _store_reply(connection: AsyncConnection, answer: Answer) -> StoredReply:
    if answer.interruptible and await bursts.interrupted(
        connection, answer.conversation_id, max(answer.answered_ids), answer.call_id
    ):
        if answer.call is not None:
            await insert_call(connection, answer.call, status=CallStatus.SUPERSEDED)
        return StoredReply(Stored.INTERRUPTED)
    claimed = await connection.execute(
        _MARK_ANSWERED, {"answered_ids": list(answer.answered_ids), "now": utcnow()}
    )
    if claimed.rowcount != len(answer.answered_ids):
        raise _AnsweredElsewhere  # rolls the transaction back
    parts = await insert_greeting(connection, answer.greeting)
    answer_parts = await insert_parts(connection, answer)
    await _link_call(connection, answer, answer_parts[0].id if answer_parts else None)
    if answer.taken_over:
        await close_taken_over(connection, answer.taken_over)
    parts += answer_parts
    if answer.start_sending:
        parts = await start_first(connection, parts)
    return StoredReply(Stored.STORED, parts)


async def insert_greeting(connection: AsyncConnection, greeting: Answer | None) -> list[Part]:
    """The greeting's parts, unless the conversation already has an assistant message (it is
    not new, or it was greeted): checked in the answer's transaction, so "once" holds across
    retries and racing workers."""
    if greeting is None:
        return []
    replied = await connection.scalar(_ANY_REPLY, {"conversation_id": greeting.conversation_id})
    return [] if replied is not None else await insert_parts(connection, greeting)


async def start_first(connection: AsyncConnection, parts: list[Part]) -> list[Part]:
    """The parts, the first one `held` when its compare-and-set (in the caller's transaction,
    the one that stored it) was won."""
    if parts and await _start_sending(connection, parts[0]):
        return [_held(parts[0]), *parts[1:]]
    return parts


async def _link_call(connection: AsyncConnection, answer: Answer, first_id: int | None) -> None:
    """The answer's model call: its record inserted here (`answer.call`), or, recorded
    already (`answer.call_id`), linked to the answer's first part."""
    if answer.call is not None:
        await insert_call(connection, answer.call, message_id=first_id)
    elif answer.call_id is not None and first_id is not None:
        await connection.execute(_LINK_CALL, {"call_id": answer.call_id, "first_id": first_id})


class _AnsweredElsewhere(Exception):
    pass


async def insert_parts(connection: AsyncConnection, answer: Answer) -> list[Part]:
    """Insert the parts in order; returns them as `Part`s, pending."""
    now = utcnow()
    parts = []
    for number, body in enumerate(answer.parts, start=1):
        result = await connection.execute(
            _INSERT_PART,
            {
                "conversation_id": answer.conversation_id,
                "created_at": now,
                "updated_at": now,
                "channel": answer.channel,
                "sender": Sender.ASSISTANT.value,
                "author": answer.author.value,
                "fixed_kind": answer.fixed_kind,
                "intent": Intent.MESSAGE.value,
                "body": body,
                "part": number,
                "subject": answer.subject,
                "headers": answer.headers or None,
                "status": Delivery.PENDING.value,
                "reply_to_id": answer.answered_ids[-1] if answer.answered_ids else None,
            },
        )
        parts.append(
            Part(
                id=int(result.scalar_one()),
                conversation_id=answer.conversation_id,
                channel=answer.channel,
                author=answer.author.value,
                body=body,
                subject=answer.subject,
                headers=answer.headers,
                status=Delivery.PENDING.value,
                attempted_at=None,
                number=number,
            )
        )
    return parts


async def mark_inbound(
    engine: AsyncEngine,
    message_ids: Sequence[int],
    state: InboundState,
    *,
    error: str | None = None,
    only_waiting: bool = False,
) -> int:
    """Set the user's messages' state (`only_waiting`: those still `received`); returns how many."""
    query = update(Message).where(Message.id.in_(message_ids))
    if only_waiting:
        query = query.where(Message.status == InboundState.RECEIVED.value)
    values: dict[str, Any] = {"status": state.value, "updated_at": utcnow()}
    if error is not None:
        values["error"] = error
    statement = query.values(**values)

    async def mark(connection: AsyncConnection) -> int:
        return int((await connection.execute(statement)).rowcount)

    return await group_commit(engine).run(mark)


# ---------------------------------------------------------------- sending


def unsent_query(conversation_id: int) -> Any:
    """The conversation's parts still `pending` or `sending`, in the order they go out."""
    return (
        select(
            Message.id,
            Message.conversation_id,
            Message.channel,
            Message.author,
            Message.body,
            Message.part,
            Message.subject,
            Message.headers,
            Message.status,
            Message.attempted_at,
        )
        .where(
            Message.conversation_id == conversation_id,
            Message.sender == Sender.ASSISTANT.value,
            Message.status.in_(UNSENT),
        )
        .order_by(Message.id)
    )


def part_of(row: Any) -> Part:
    """A `Part` from a row holding (at least) `unsent_query`'s columns."""
    return Part(
        id=row.id,
        conversation_id=row.conversation_id,
        channel=row.channel,
        author=row.author,
        body=row.body,
        subject=row.subject,
        headers=str_headers(row.headers),
        status=row.status,
        attempted_at=row.attempted_at,
        number=row.part,
    )


async def unsent_parts(engine: AsyncEngine, conversation_id: int) -> list[Part]:
    """The conversation's parts still `pending` or `sending`, in the order they go out."""
    async with reader(engine).connect() as connection:
        return [part_of(row) for row in await connection.execute(unsent_query(conversation_id))]


async def start_sending(engine: AsyncEngine, part: Part) -> bool:
    """`pending -> sending` by compare-and-set, only while the person has not opted out and,
    for the model's replies, the conversation is not paused: both may change during a model
    call. True for the one caller that moved it."""
    return await group_commit(engine).run(functools.partial(_start_sending, part=part))


def _sendable(part: Part) -> Any:
    sendable = select(Conversation.id).where(
        Conversation.id == part.conversation_id, Conversation.opted_out.is_(False)
    )
    if part.author == Author.MODEL.value:
        sendable = sendable.where(Conversation.paused.is_(False))
    return sendable


async def _start_sending(connection: AsyncConnection, part: Part) -> bool:
    result = await connection.execute(
        _START_SENDING[part.author == Author.MODEL.value],
        {"part_id": part.id, "sendable_id": part.conversation_id, "now": utcnow()},
    )
    return bool(result.rowcount)


async def take_over(engine: AsyncEngine, part: Part) -> bool:
    """A part found in `sending` (and not found at the provider) is sent again only by the one
    caller whose compare-and-set moves its `attempted_at` on from what it read: a stalled
    worker that wakes up later finds it changed and does not send it a second time."""
    assert part.attempted_at is not None
    now = utcnow()
    statement = (
        update(Message)
        .where(
            Message.id == part.id,
            Message.status == Delivery.SENDING.value,
            Message.attempted_at == part.attempted_at,
            Message.conversation_id.in_(_sendable(part)),
        )
        .values(attempted_at=now, updated_at=now)
    )

    async def take(connection: AsyncConnection) -> bool:
        return bool((await connection.execute(statement)).rowcount)

    return await group_commit(engine).run(take)


def _held(part: Part) -> Part:
    return dataclasses.replace(part, status=Delivery.SENDING.value, held=True)


@dataclass(frozen=True)
class Then:
    """What the transaction that records a send also does: take the next part (its
    compare-and-set) or, after the last one, finish the job."""

    next_part: Part | None = None
    finish: Claim | None = None


async def _then(connection: AsyncConnection, then: Then | None) -> Part | None:
    """Apply `then`; returns the next part, held, when its compare-and-set was won."""
    if then is None:
        return None
    if then.finish is not None:
        await finish_jobs(connection, then.finish)
    if then.next_part is not None and await _start_sending(connection, then.next_part):
        return _held(then.next_part)
    return None


async def set_status(
    engine: AsyncEngine,
    message_id: int,
    status: Delivery,
    then: Then | None = None,
    *,
    note: str | None = None,
) -> Part | None:
    """Set a part's status (with `note`, why, shown as its error); then `then`."""
    statement = _SET_STATUS
    values = {"part_id": message_id, "new_status": status.value, "now": utcnow()}
    if note is not None:
        statement, values = _SET_STATUS_NOTED, {**values, "note": note}

    async def set_it(connection: AsyncConnection) -> Part | None:
        await connection.execute(statement, values)
        return await _then(connection, then)

    return await group_commit(engine).run(set_it)


async def first_unrecorded(
    engine: AsyncEngine, channel: str, candidates: Sequence[str]
) -> str | None:
    """The oldest candidate no stored message claims: an identical earlier reply is not ours."""
    if not candidates:
        return None
    async with reader(engine).connect() as connection:
        known = set(
            await connection.scalars(
                select(Message.provider_message_id).where(
                    Message.channel == channel, Message.provider_message_id.in_(candidates)
                )
            )
        )
    return next((sid for sid in candidates if sid not in known), None)


async def record_sent(
    engine: AsyncEngine,
    message_id: int,
    channel: str,
    provider_message_id: str,
    status: Delivery,
    then: Then | None = None,
) -> Part | None:
    """Store a send's provider id and status, merged with any callback that came first; then
    `then` in the same transaction (returns the next part when held)."""

    async def record(connection: AsyncConnection) -> Part | None:
        reports = (
            await connection.execute(
                _TAKE_REPORTS, {"channel": channel, "sid": provider_message_id}
            )
        ).all()
        final, error = status, None
        for report in reports:
            reported = Delivery(report.status)
            if DELIVERY_RANK[reported] > DELIVERY_RANK[final]:
                final, error = reported, report.error or error
        await connection.execute(
            _MARK_SENT,
            {
                "part_id": message_id,
                "new_status": final.value,
                "sid": provider_message_id,
                "new_error": error or None,
                "now": utcnow(),
            },
        )
        return await _then(connection, then)

    return await group_commit(engine).run(record)


# ---------------------------------------------------------------- failing


async def fail_unsent(
    engine: AsyncEngine,
    conversation_id: int,
    error: str,
    *,
    model_only: bool = False,
    opted_out: bool = False,
    waiting_ids: Sequence[int] = (),
    waiting_state: InboundState = InboundState.FAILED,
) -> tuple[int, int]:
    """In one transaction: fail the conversation's unsent parts (`model_only`: the model's
    only), move its claimed messages still waiting (`waiting_ids`) to `waiting_state`, and
    mark the conversation opted out when the provider said so. Returns (messages moved, parts
    failed), for the metrics."""
    async with engine.begin() as connection:
        moved = 0
        if waiting_ids:
            values: dict[str, Any] = {"status": waiting_state.value, "updated_at": utcnow()}
            if waiting_state is InboundState.FAILED:
                values["error"] = error
            result = await connection.execute(
                update(Message)
                .where(
                    Message.id.in_(waiting_ids),
                    Message.status == InboundState.RECEIVED.value,
                )
                .values(**values)
            )
            moved = int(result.rowcount)
        if opted_out:
            await connection.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id)
                .values(opted_out=True, updated_at=utcnow())
            )
        return moved, await _fail_parts(connection, conversation_id, error, model_only)


async def _fail_parts(
    connection: AsyncConnection, conversation_id: int, error: str, model_only: bool
) -> int:
    query = update(Message).where(
        Message.conversation_id == conversation_id,
        Message.sender == Sender.ASSISTANT.value,
        Message.status.in_(UNSENT),
    )
    if model_only:
        query = query.where(Message.author == Author.MODEL.value)
    failed = await connection.execute(
        query.values(status=Delivery.FAILED.value, error=error, updated_at=utcnow())
    )
    return int(failed.rowcount)


# ---------------------------------------------------------------- delivery callbacks


async def update_delivery(
    engine: AsyncEngine,
    channel: str,
    provider_message_id: str,
    status: Delivery,
    error: str | None,
) -> bool:
    """Apply a provider's delivery report, forward only: a late `sent` never undoes
    `delivered`. Returns whether a message moved; raises `StorageFailure` as the writer does.
    The id and error are made storable here, the one door for every channel's reports."""
    provider_message_id, error = storable.provider_id(provider_message_id), storable.error(error)
    earlier = [d.value for d, rank in DELIVERY_RANK.items() if rank < DELIVERY_RANK[status]]
    values: dict[str, Any] = {"status": status.value, "updated_at": utcnow()}
    if error:
        values["error"] = error
    with storage_errors():
        async with engine.begin() as connection:
            result = await connection.execute(
                update(Message)
                .where(
                    and_(
                        Message.channel == channel,
                        Message.provider_message_id == provider_message_id,
                        Message.sender == Sender.ASSISTANT.value,
                        Message.status.in_(earlier),
                    )
                )
                .values(**values)
            )
            if result.rowcount:
                return True
            known = await connection.scalar(
                select(Message.id).where(
                    Message.channel == channel, Message.provider_message_id == provider_message_id
                )
            )
            if known is None:  # the callback beat the send's own answer: keep it for then
                await _keep_report(connection, channel, provider_message_id, status, error)
    return False


async def _keep_report(
    connection: AsyncConnection,
    channel: str,
    provider_message_id: str,
    status: Delivery,
    error: str | None,
) -> None:
    now = utcnow()
    await connection.execute(
        delete(DeliveryReport).where(DeliveryReport.created_at < now - REPORT_TTL)
    )
    await connection.execute(
        insert(DeliveryReport),
        [
            {
                "created_at": now,
                "channel": channel,
                "provider_message_id": provider_message_id,
                "status": status.value,
                "error": error,
            }
        ],
    )
