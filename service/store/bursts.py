"""A person still typing while the model answers (SPEC §12): the newer messages that interrupt
an answer before it is stored.

A reply job answers the messages it claimed. A newer message of the person (not a keyword, not
HELP: those have their own fixed answers) that arrived meanwhile is still `received`, its job
queued behind the running one. The check for one and the storing of the answer are one
transaction (`outbox.store_answer`), so an answer is either stored before the newer message
arrived (which then gets its own reply, after this one) or dropped, its call recorded
`superseded`, and the model asked again with the newer messages too.
"""

from __future__ import annotations

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db import reader, unindexed
from service.models import AssistantCall, Message
from service.types import CallStatus, InboundState, Intent, Sender

# Built once (every interruptible answer checks): a call only binds the conversation and id.
_NEWER_WAITING = (
    Message.conversation_id == bindparam("conversation_id"),
    Message.id > bindparam("after_id"),
    Message.sender == Sender.USER.value,
    Message.intent == Intent.MESSAGE.value,
    unindexed(Message.status) == InboundState.RECEIVED.value,  # the conversation's index
)
_FIRST_NEWER = select(Message.id).where(*_NEWER_WAITING).limit(1)
_ALL_NEWER = select(Message.id).where(*_NEWER_WAITING).order_by(Message.id)
_SUPERSEDE_CALL = (
    update(AssistantCall)
    .where(AssistantCall.id == bindparam("call_id"))
    .values(status=CallStatus.SUPERSEDED.value)
)


async def interrupted(
    connection: AsyncConnection, conversation_id: int, after_id: int, call_id: int | None
) -> bool:
    """Inside the transaction that would store an answer to the messages up to `after_id`:
    whether a newer one waits. If so the answer is not stored and its call (`call_id`) is
    recorded `superseded`, in the same transaction."""
    newer = await connection.scalar(
        _FIRST_NEWER, {"conversation_id": conversation_id, "after_id": after_id}
    )
    if newer is None:
        return False
    if call_id is not None:
        await connection.execute(_SUPERSEDE_CALL, {"call_id": call_id})
    return True


async def newer_waiting(engine: AsyncEngine, conversation_id: int, after_id: int) -> list[int]:
    """The ids of the person's messages newer than `after_id` still waiting for their reply,
    oldest first: what an interrupted answer takes over and asks the model again with."""
    async with reader(engine).connect() as connection:
        return list(
            await connection.scalars(
                _ALL_NEWER, {"conversation_id": conversation_id, "after_id": after_id}
            )
        )
