"""One conversation's reply job, step by step, each step recorded before the next.

0. Read the job's state once (`store.reply_state`): the conversation, the claimed messages
   still waiting, the parts it still owes and the history (and summary) the model is shown.
1. Send whatever this conversation still owes (a reply stored before a crash, an operator's
   message, a fixed text), in order.
2. Answer the claimed messages still waiting: HELP with the fixed text, the rest with one model
   call over the bounded history. The answer is stored, cut to the channel's limits, *before*
   anything is sent, so a failed send never asks the model again.
3. Send it. Each part goes `pending -> sending` by compare-and-set before the provider is
   called, so two processes never send one part, and a part found in `sending` after a crash
   is looked up at the provider before it is sent again, and resent only by the one worker
   whose compare-and-set takes it over. A lost compare-and-set stops the job: the parts
   after it are not sent out of order.

Writes that follow each other share a unit of work (the answer with its model call's record,
the supersede check, the greeting when owed and the first part's compare-and-set; each send's
record with the next part's compare-and-set), and the unit that records the last send also
finishes the job: a one-part reply costs the state read, the model-call budget, the answer and
the send, four units. The three writes go through the engine's group commit
(`service/group_commit.py`): the jobs' writes ready at the same time share one transaction, so
with many jobs in flight a reply costs a share of one read transaction (the state reads of
the moment share one too, `group_read`) and a share of one write transaction. Each step
still hears of its write only after the commit. A job that ends without a last send is
finished by a unit of its own.

Outcomes the worker acts on are exceptions: `RetryLater`, `GiveUp` and `Superseded`.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from service import metrics
from service.assistant import Model
from service.channels.base import ChannelPlugin
from service.db import utcnow
from service.profiles import Profiles
from service.queue.manager import Claim, finish_claim
from service.settings import Settings
from service.store import AsyncEngine, outbox
from service.store.reply_state import ReplyState, read_reply_state
from service.types import Channel, InboundState


class Outcome(enum.StrEnum):
    """How a reply job ended, as the worker's log line says it."""

    SENT = "sent"
    ANSWERED = "answered"
    RATE_LIMITED = "rate_limited"
    DELETED = "deleted"
    OPTED_OUT = "opted_out"
    WITHHELD = "withheld"
    PAUSED = "paused"
    OWN_ADDRESS = "own_address"
    CLOSED = "closed"  # outside the profile's hours, the after-hours reply already sent
    # the worker's own
    RETRY = "retry"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    RELEASED = "released"
    ERROR = "error"


@dataclass(frozen=True)
class Answered:
    """What `Answerer.answer` stored: how it went, and the parts to send in order (the first
    one already moved to `sending` by this job where it could)."""

    outcome: Outcome
    parts: list[outbox.Part]


@dataclass(frozen=True)
class ReplyContext:
    """What every reply job of a process works with."""

    engine: AsyncEngine
    settings: Settings
    model: Model
    channels: Mapping[Channel, ChannelPlugin]
    profiles: Profiles | None = None  # None: the variables alone, no PROFILES_FILE
    clock: Callable[[], dt.datetime] = field(default=utcnow)  # opening hours are judged by it


class RetryLater(Exception):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GiveUp(Exception):
    """A definite refusal: trying again cannot help."""


class Superseded(Exception):
    """This worker lost its claim (stalled past its lease) and another one did the work."""


class Withheld(Exception):
    """The conversation no longer allows this reply (opted out, or paused for the model's)."""

    def __init__(self, reason: str, *, model_only: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.model_only = model_only


class ReplyFlow:
    def __init__(self, context: ReplyContext) -> None:
        from service.reply.answer import Answerer  # they raise this module's exceptions
        from service.reply.send import PartSender

        self._engine = context.engine
        self._rate_window = dt.timedelta(seconds=context.settings.rate_limit.window_s)
        self._answerer = Answerer(context)
        self._sender = PartSender(context.engine, context.channels)

    async def run(self, claim: Claim) -> Outcome:
        """Do the claim's work and finish its jobs; returns the outcome for the log line."""
        outcome, finished = await self._run(claim)
        if not finished:
            await finish_claim(self._engine, claim)
        return outcome

    async def _run(self, claim: Claim) -> tuple[Outcome, bool]:
        """(the outcome, whether the last send's transaction finished the jobs already)."""
        state = await read_reply_state(
            self._engine,
            claim.conversation_id,
            claim.message_ids,
            calls_since=utcnow() - self._rate_window,
            history=self._answerer.history_wanted,
        )
        if state is None:
            return Outcome.DELETED, False
        if state.conversation.opted_out:
            await self._fail(claim, "recipient opted out", InboundState.NOT_ANSWERED)
            return Outcome.OPTED_OUT, False
        if state.unsent:
            last = None if state.waiting else claim  # nothing else to do: finish with it
            if stopped := await self._sender.send(state.conversation, state.unsent, last):
                # Opted out or paused meanwhile: the claimed messages will not be answered.
                await self._not_answered(claim)
                return stopped, False
            if last is not None:
                return Outcome.SENT, True
        return await self._answer_and_send(claim, state)

    async def _answer_and_send(self, claim: Claim, state: ReplyState) -> tuple[Outcome, bool]:
        conversation, waiting = state.conversation, state.waiting
        if not waiting:
            return Outcome.SENT, False
        if conversation.paused:
            await self._not_answered(claim)
            return Outcome.PAUSED, False
        if conversation.own_address:
            await self._not_answered(claim)
            return Outcome.OWN_ADDRESS, False  # answering ourselves is a loop
        # What it stored (a greeting, the answer, an after-hours text), in the order it goes.
        answered = await self._answerer.answer(
            conversation, waiting, state.history, replied=state.replied
        )
        if not answered.parts:
            return answered.outcome, False
        stopped = await self._sender.send(conversation, answered.parts, claim)
        return stopped or answered.outcome, stopped is None

    async def give_up(self, claim: Claim, error: str) -> None:
        """After the last try: the waiting messages and anything unsent are marked failed."""
        await self._fail(claim, error, InboundState.FAILED)

    async def _fail(self, claim: Claim, error: str, waiting_state: InboundState) -> None:
        moved, failed = await outbox.fail_unsent(
            self._engine,
            claim.conversation_id,
            error,
            waiting_ids=claim.message_ids,
            waiting_state=waiting_state,
        )
        if waiting_state is InboundState.FAILED:
            metrics.count_replies("failed", moved)
        metrics.count_replies("failed", failed)

    async def _not_answered(self, claim: Claim) -> None:
        await outbox.mark_inbound(
            self._engine, claim.message_ids, InboundState.NOT_ANSWERED, only_waiting=True
        )
