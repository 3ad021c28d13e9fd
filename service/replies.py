"""One conversation's reply job, step by step, each step recorded before the next.

1. Send whatever this conversation still owes (a reply stored before a crash, an operator's
   message, a fixed text), in order.
2. Answer the claimed messages still waiting: HELP with the fixed text, the rest with one model
   call over the bounded history. The answer is stored, cut to the channel's limits, *before*
   anything is sent, so a failed send never asks the model again.
3. Send it. Each part goes `pending -> sending` by compare-and-set before the provider is
   called, so two processes never send one part, and a part found in `sending` after a crash
   is looked up at the provider before it is sent again.

Outcomes the worker acts on are exceptions: `RetryLater` and `GiveUp`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service import metrics, storable
from service.assistant import Completion, Model, ModelError
from service.budget import ModelCallBudget
from service.channels.base import ChannelClient, LookupUnsupported
from service.conversation import HELP_TEXT, build_prompt
from service.db import reader, session_factory, utcnow
from service.jobs import Claim
from service.models import AssistantCall, Conversation, Message
from service.settings import Settings
from service.store import record_sent
from service.types import (
    Author,
    Channel,
    Delivery,
    InboundState,
    Intent,
    Outbound,
    RecipientOptedOut,
    Sender,
    SendError,
    Turn,
)

log = logging.getLogger(__name__)

UNSENT = (Delivery.PENDING.value, Delivery.SENDING.value)


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
    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        model: Model,
        channels: Mapping[Channel, ChannelClient],
    ) -> None:
        self._sessions: async_sessionmaker[AsyncSession] = session_factory(engine)
        self._reads = session_factory(reader(engine))  # never waits for SQLite's write lock
        self._settings = settings
        self._model = model
        self._channels = channels
        self._warned_until: dict[int, float] = {}
        self._budget = ModelCallBudget(engine, settings.model_calls_cap, settings.model_calls_limit)

    # ------------------------------------------------------------ the steps

    async def run(self, claim: Claim) -> str:
        """Do the claim's work; returns a one-word outcome for the log line."""
        conversation = await self._conversation(claim.conversation_id)
        if conversation is None:
            return "deleted"
        if conversation.opted_out:
            await self._drop_opted_out(claim)
            return "opted_out"
        if stopped := await self._send_unsent(conversation):
            # Opted out or paused meanwhile: the claimed messages will not be answered.
            await self._mark(await self._waiting(claim), InboundState.NOT_ANSWERED)
            return stopped
        waiting = await self._waiting(claim)
        if not waiting:
            return "sent"
        if conversation.paused:
            await self._mark(waiting, InboundState.NOT_ANSWERED)
            return "paused"
        if await self._is_own_address(conversation.remote_address):
            await self._mark(waiting, InboundState.NOT_ANSWERED)
            return "own_address"  # answering ourselves is a loop
        outcome = await self._answer(conversation, waiting)
        return await self._send_unsent(conversation) or outcome

    async def _answer(self, conversation: Conversation, waiting: list[Message]) -> str:
        helps = [m for m in waiting if m.intent == Intent.HELP.value]
        questions = [m for m in waiting if m.intent != Intent.HELP.value]
        steps = sorted(
            [(group[0].id, group) for group in (helps, questions) if group],
            key=lambda s: s[0],
        )
        outcome = "answered"
        for _, group in steps:
            if group is helps:
                await self._store_reply(conversation, helps, HELP_TEXT, Author.FIXED)
            elif scope := await self._limit_reached(conversation):
                await self._mark(questions, InboundState.RATE_LIMITED)
                metrics.count_rate_limited(scope, len(questions))
                outcome = "rate_limited"
            else:
                completion, call_id = await self._ask_model(conversation, questions)
                await self._store_reply(
                    conversation, questions, completion.text, Author.MODEL, call_id
                )
        return outcome

    async def give_up(self, claim: Claim, error: str) -> None:
        """After the last try: the waiting messages and anything unsent are marked failed."""
        async with self._sessions.begin() as session:
            unanswered = await session.execute(
                update(Message)
                .where(
                    Message.id.in_(claim.message_ids),
                    Message.status == InboundState.RECEIVED.value,
                )
                .values(status=InboundState.FAILED.value, error=error, updated_at=utcnow())
            )
            metrics.count_replies("failed", unanswered.rowcount)  # type: ignore[attr-defined]
            await _fail_unsent(session, claim.conversation_id, error)

    # ------------------------------------------------------------ reading

    async def _conversation(self, conversation_id: int) -> Conversation | None:
        async with self._reads() as session:
            return await session.get(Conversation, conversation_id)

    async def _waiting(self, claim: Claim) -> list[Message]:
        async with self._reads() as session:
            result = await session.scalars(
                select(Message)
                .where(
                    Message.id.in_(claim.message_ids),
                    Message.sender == Sender.USER.value,
                    Message.status == InboundState.RECEIVED.value,
                )
                .order_by(Message.id)
            )
            return list(result)

    async def _history(self, conversation_id: int, new_ids: Sequence[int]) -> list[Turn]:
        """Earlier turns, newest `ASSISTANT_HISTORY_MESSAGES` of them: the user's messages (not
        keywords) and the replies written by the model or an operator; parts joined. A reply
        stored after a new message arrived (a burst) is still history, so it counts by id but
        the new messages themselves do not."""
        limit = self._settings.assistant_history_messages
        if limit == 0:
            return []
        async with self._reads() as session:
            rows = (
                await session.execute(
                    select(Message.sender, Message.body, Message.reply_to_id)
                    .where(
                        Message.conversation_id == conversation_id,
                        Message.id.not_in(new_ids),
                        or_(
                            and_(
                                Message.sender == Sender.USER.value,
                                Message.intent == Intent.MESSAGE.value,
                                Message.id < max(new_ids),
                            ),
                            and_(
                                Message.sender == Sender.ASSISTANT.value,
                                Message.author.in_([Author.MODEL.value, Author.OPERATOR.value]),
                                Message.status != Delivery.FAILED.value,
                            ),
                        ),
                    )
                    .order_by(Message.id.desc())
                    .limit(limit * 4)  # a reply may be several parts
                )
            ).all()
        return _join_parts(list(reversed(rows)))[-limit:]

    async def _is_own_address(self, address: str) -> bool:
        """Whether Parley itself receives at this address (any conversation's local side)."""
        async with self._reads() as session:
            found = await session.scalar(
                select(Conversation.id).where(Conversation.local_address == address).limit(1)
            )
        return found is not None

    async def _limit_reached(self, conversation: Conversation) -> str | None:
        """Which limit forbids a model call now, "conversation" (`REPLY_RATE_LIMIT`) or
        "global" (`MODEL_CALLS_LIMIT`), or None; passing the global one takes a place in its
        window, so only ask right before the call."""
        if await self._over_rate_limit(conversation):
            return "conversation"
        if not await self._budget.take():
            return "global"
        return None

    async def _over_rate_limit(self, conversation: Conversation) -> bool:
        limit = self._settings.rate_limit
        since = utcnow() - dt.timedelta(seconds=limit.window_s)
        async with self._reads() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(AssistantCall)
                .where(
                    AssistantCall.conversation_id == conversation.id,
                    AssistantCall.status == "ok",
                    AssistantCall.created_at >= since,
                )
            )
        if (count or 0) < limit.count:
            return False
        now = utcnow().timestamp()
        if self._warned_until.get(conversation.id, 0) < now:
            self._warned_until[conversation.id] = now + limit.window_s
            log.warning(
                "conversation %s reached REPLY_RATE_LIMIT (%s): not answering",
                conversation.id,
                self._settings.reply_rate_limit,
            )
        return True

    # ------------------------------------------------------------ the model

    async def _ask_model(
        self, conversation: Conversation, questions: Sequence[Message]
    ) -> tuple[Completion, int]:
        history = await self._history(conversation.id, [m.id for m in questions])
        prompt = build_prompt(
            self._settings.assistant_system_prompt,
            self._channels[Channel(conversation.channel)].style,
            history,
            [Turn(Sender.USER, m.body) for m in questions],
            max_messages=self._settings.assistant_history_messages,
            max_tokens=self._settings.assistant_history_tokens,
        )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._settings.assistant_timeout_s + 5):
                completion = await self._model.complete(prompt)
        except (ModelError, TimeoutError) as exc:
            error = (
                exc
                if isinstance(exc, ModelError)
                else ModelError("model call timed out", retryable=True)
            )
            error.latency_ms = error.latency_ms or int((time.perf_counter() - started) * 1000)
            await self._record_call(conversation.id, None, error=error)
            if error.retryable:
                raise RetryLater(str(error), error.retry_after_s) from exc
            raise GiveUp(str(error)) from exc
        call_id = await self._record_call(conversation.id, completion)
        return completion, call_id

    async def _record_call(
        self,
        conversation_id: int,
        completion: Completion | None,
        error: ModelError | None = None,
    ) -> int:
        call = AssistantCall(
            conversation_id=conversation_id,
            model=completion.model if completion else self._model.name,
            generation_params=completion.params if completion else self._model.params,
            processing_time=completion.latency_ms
            if completion
            else (error.latency_ms if error else 0),
            status="ok" if completion else "error",
            prompt_tokens=completion.prompt_tokens if completion else None,
            completion_tokens=completion.completion_tokens if completion else None,
            total_tokens=completion.total_tokens if completion else None,
            error=str(error) if error else None,
        )
        metrics.observe_model_call(
            call.processing_time / 1000,
            completion is not None,
            call.prompt_tokens,
            call.completion_tokens,
        )
        async with self._sessions.begin() as session:
            session.add(call)
        return call.id

    # ------------------------------------------------------------ writing

    async def _store_reply(
        self,
        conversation: Conversation,
        answered: Sequence[Message],
        text: str,
        author: Author,
        call_id: int | None = None,
    ) -> None:
        """The reply's parts and the answered messages' new state, in one transaction."""
        channel = self._channels[Channel(conversation.channel)]
        last = answered[-1]
        subject, headers = channel.reply_envelope(
            last.subject, _str_headers(last.headers), conversation.local_address
        )
        parts = [
            Message(
                conversation_id=conversation.id,
                channel=conversation.channel,
                sender=Sender.ASSISTANT.value,
                author=author.value,
                intent=Intent.MESSAGE.value,
                body=part,
                subject=subject,
                headers=headers or None,
                status=Delivery.PENDING.value,
                reply_to_id=last.id,
            )
            # A model may answer with NUL or stray control characters: PostgreSQL refuses NUL.
            for part in channel.split(storable.text(text))
        ]
        async with self._sessions.begin() as session:
            claimed = await session.execute(
                update(Message)
                .where(
                    Message.id.in_([m.id for m in answered]),
                    Message.status == InboundState.RECEIVED.value,
                )
                .values(status=InboundState.ANSWERED.value, updated_at=utcnow())
            )
            if claimed.rowcount != len(answered):  # type: ignore[attr-defined]
                # Another worker answered them while this one was stalled past its lease.
                raise Superseded(f"messages {[m.id for m in answered]} were answered elsewhere")
            session.add_all(parts)
            await session.flush()
            if call_id is not None and parts:
                await session.execute(
                    update(AssistantCall)
                    .where(AssistantCall.id == call_id)
                    .values(message_id=parts[0].id)
                )

    async def _mark(self, messages: Sequence[Message], state: InboundState) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                update(Message)
                .where(Message.id.in_([m.id for m in messages]))
                .values(status=state.value, updated_at=utcnow())
            )

    async def _drop_opted_out(self, claim: Claim) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                update(Message)
                .where(
                    Message.id.in_(claim.message_ids),
                    Message.status == InboundState.RECEIVED.value,
                )
                .values(status=InboundState.NOT_ANSWERED.value, updated_at=utcnow())
            )
            await _fail_unsent(session, claim.conversation_id, "recipient opted out")

    # ------------------------------------------------------------ sending

    async def _send_unsent(self, conversation: Conversation) -> str | None:
        """Send every unsent part of the conversation in order. Returns why it stopped early
        ("opted_out", "withheld"), or None once all went out."""
        async with self._reads() as session:
            parts = list(
                await session.scalars(
                    select(Message)
                    .where(
                        Message.conversation_id == conversation.id,
                        Message.sender == Sender.ASSISTANT.value,
                        Message.status.in_(UNSENT),
                    )
                    .order_by(Message.id)
                )
            )
        for part in parts:
            try:
                await self._send_part(conversation, part)
            except RecipientOptedOut as exc:
                await self._opted_out_by_provider(conversation, part, str(exc))
                return "opted_out"
            except Withheld as withheld:
                await self._withhold(conversation.id, withheld.reason, withheld.model_only)
                return "withheld"
        return None

    async def _send_part(self, conversation: Conversation, part: Message) -> None:
        channel = self._channels[Channel(conversation.channel)]
        outbound = Outbound(
            channel=Channel(conversation.channel),
            to=conversation.remote_address,
            from_=conversation.local_address,
            body=part.body,
            subject=part.subject,
            headers=_str_headers(part.headers),
        )
        if not channel.can_send:
            await self._set_status(part.id, Delivery.NOT_SENT)
            metrics.count_replies("not_sent")
            log.info(
                "reply %s in conversation %s not sent: no %s credentials configured",
                part.id,
                conversation.id,
                conversation.channel,
            )
            return
        if part.status == Delivery.SENDING.value and part.attempted_at is not None:
            if await self._already_sent(channel, outbound, part):
                return
        elif not await self._start_sending(part):
            await self._why_not_sendable(part)
            return  # another process holds this part
        sending = time.perf_counter()
        try:
            result = await channel.send(outbound)
        except SendError as exc:
            metrics.observe_send(part.channel, time.perf_counter() - sending, exc.retryable)
            if isinstance(exc, RecipientOptedOut):
                raise
            await self._after_send_error(part, exc)
            raise AssertionError("unreachable") from exc
        metrics.observe_send(part.channel, time.perf_counter() - sending)
        metrics.count_replies("sent")
        if result.provider_message_id:
            await self._record_sent(part, result.provider_message_id, result.status)
        else:
            await self._set_status(part.id, result.status)

    async def _already_sent(
        self, channel: ChannelClient, outbound: Outbound, part: Message
    ) -> bool:
        """A part left in `sending` may have gone out: ask the provider before sending again."""
        assert part.attempted_at is not None
        try:
            candidates = await channel.find_sent(outbound, part.attempted_at)
        except LookupUnsupported:
            return False
        except Exception as exc:
            raise RetryLater(f"could not check whether reply {part.id} went out: {exc}") from exc
        sid = await self._first_unrecorded(part.channel, candidates)
        if sid is None:
            return False
        log.info("reply %s had gone out before (%s): not sending it again", part.id, sid)
        await self._record_sent(part, sid, Delivery.QUEUED)
        return True

    async def _first_unrecorded(self, channel: str, candidates: Sequence[str]) -> str | None:
        """The oldest candidate no stored message claims: an identical earlier reply is not ours."""
        if not candidates:
            return None
        async with self._reads() as session:
            known = set(
                await session.scalars(
                    select(Message.provider_message_id).where(
                        Message.channel == channel, Message.provider_message_id.in_(candidates)
                    )
                )
            )
        return next((sid for sid in candidates if sid not in known), None)

    async def _after_send_error(self, part: Message, exc: SendError) -> None:
        if exc.retryable:
            if not exc.ambiguous:  # surely not sent: the next try sends without looking
                await self._set_status(part.id, Delivery.PENDING)
            raise RetryLater(str(exc), exc.retry_after_s) from exc
        async with self._sessions.begin() as session:
            await _fail_unsent(session, part.conversation_id, str(exc))
        raise GiveUp(str(exc)) from exc

    async def _start_sending(self, part: Message) -> bool:
        """`pending -> sending`, only while the person has not opted out and, for the model's
        replies, the conversation is not paused: both may change during a model call."""
        sendable = select(Conversation.id).where(
            Conversation.id == part.conversation_id, Conversation.opted_out.is_(False)
        )
        if part.author == Author.MODEL.value:
            sendable = sendable.where(Conversation.paused.is_(False))
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Message)
                .where(
                    Message.id == part.id,
                    Message.status == Delivery.PENDING.value,
                    Message.conversation_id.in_(sendable),
                )
                .values(
                    status=Delivery.SENDING.value,
                    attempted_at=utcnow(),
                    updated_at=utcnow(),
                )
            )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def _why_not_sendable(self, part: Message) -> None:
        """After a lost compare-and-set: raise `Withheld` if the conversation forbids sending."""
        conversation = await self._conversation(part.conversation_id)
        if conversation is None or conversation.opted_out:
            raise Withheld("recipient opted out", model_only=False)
        if conversation.paused and part.author == Author.MODEL.value:
            raise Withheld("withheld: the conversation was paused", model_only=True)

    async def _withhold(self, conversation_id: int, reason: str, model_only: bool) -> None:
        log.info("conversation %s: unsent replies withheld (%s)", conversation_id, reason)
        async with self._sessions.begin() as session:
            await _fail_unsent(session, conversation_id, reason, model_only=model_only)

    async def _set_status(self, message_id: int, status: Delivery) -> None:
        async with self._sessions.begin() as session:
            await session.execute(
                update(Message)
                .where(Message.id == message_id)
                .values(status=status.value, updated_at=utcnow())
            )

    async def _record_sent(self, part: Message, provider_message_id: str, status: Delivery) -> None:
        async with self._sessions.begin() as session:
            await record_sent(session, part.id, part.channel, provider_message_id, status)

    async def _opted_out_by_provider(
        self, conversation: Conversation, part: Message, error: str
    ) -> None:
        log.warning("conversation %s: provider says the recipient opted out", conversation.id)
        async with self._sessions.begin() as session:
            await session.execute(
                update(Conversation)
                .where(Conversation.id == conversation.id)
                .values(opted_out=True, updated_at=utcnow())
            )
            await _fail_unsent(session, conversation.id, error)


async def _fail_unsent(
    session: AsyncSession, conversation_id: int, error: str, *, model_only: bool = False
) -> None:
    query = update(Message).where(
        Message.conversation_id == conversation_id,
        Message.sender == Sender.ASSISTANT.value,
        Message.status.in_(UNSENT),
    )
    if model_only:
        query = query.where(Message.author == Author.MODEL.value)
    failed = await session.execute(
        query.values(status=Delivery.FAILED.value, error=error, updated_at=utcnow())
    )
    metrics.count_replies("failed", failed.rowcount)  # type: ignore[attr-defined]


def _join_parts(rows: Sequence[Any]) -> list[Turn]:
    """Consecutive parts of one split reply become one turn again."""
    turns: list[Turn] = []
    previous_reply_to: object = object()
    for row in rows:
        sender = Sender(row.sender)
        if (
            sender is Sender.ASSISTANT
            and turns
            and turns[-1].sender is sender
            and row.reply_to_id == previous_reply_to
        ):
            turns[-1] = Turn(sender, f"{turns[-1].body} {row.body}")
        else:
            turns.append(Turn(sender, row.body))
        previous_reply_to = row.reply_to_id
    return turns


def _str_headers(headers: dict[str, Any] | None) -> dict[str, str]:
    return {k: v for k, v in (headers or {}).items() if isinstance(v, str)}
