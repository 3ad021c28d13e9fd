"""Writing the reply: fixed texts (HELP, a profile's greeting and after-hours reply), the
limits (`REPLY_RATE_LIMIT` per conversation, `MODEL_CALLS_LIMIT` for the deployment), the model
call and its record. The conversation's local address picks its assistant profile (SPEC §11):
its prompt, model and options, its hours, its memory. The answer is stored, cut to the
channel's limits, before anything is sent."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Sequence

from service import memory, metrics, storable
from service.assistant import CallOptions, Completion, ModelError
from service.conversation import HELP_TEXT, PromptMessage, build_prompt
from service.db import utcnow
from service.profiles import Assistant, from_variables, no_profiles
from service.reply.attachments import Attachments
from service.reply.calls import ModelCaller
from service.reply.flow import GiveUp, Outcome, ReplyContext, RetryLater, Superseded
from service.reply.memory import Memory
from service.store import bursts, conversations, fixed, outbox
from service.store.budget import ModelCallBudget
from service.store.conversations import ConversationView, Waiting
from service.types import (
    Author,
    CallPurpose,
    Channel,
    FixedText,
    InboundState,
    Intent,
)

log = logging.getLogger(__name__)

MAX_RETAKES = 2  # SPEC §12: a reply's model call is asked again at most twice for newer messages


class Answerer:
    def __init__(self, context: ReplyContext) -> None:
        self._engine = context.engine
        self._settings = context.settings
        self._channels = context.channels
        self._attachments = Attachments(context)
        self._warned_until: dict[int, float] = {}
        settings = context.settings
        self._budget = ModelCallBudget(
            context.engine, settings.model_calls_cap, settings.model_calls_limit
        )
        self._profiles = context.profiles or no_profiles(from_variables(settings))
        self._clock = context.clock
        self._caller = ModelCaller(context.engine, context.model, settings.assistant_timeout_s)
        self._memory = Memory(
            context.engine, self._caller, self._budget, settings.summary_keep_messages
        )

    async def answer(self, conversation: ConversationView, waiting: list[Waiting]) -> Outcome:
        """HELP with its fixed text, the rest with one model call (or, outside the profile's
        hours, its after-hours reply); in the order they came."""
        assistant = self._profiles.pick(conversation.local_address)
        helps = [m for m in waiting if m.intent == Intent.HELP.value]
        questions = [m for m in waiting if m.intent != Intent.HELP.value]
        groups = sorted((group for group in (helps, questions) if group), key=lambda g: g[0].id)
        outcome = Outcome.ANSWERED
        for group in groups:
            if group is helps:
                await self._store(
                    conversation, helps, HELP_TEXT, assistant, Author.FIXED, kind=FixedText.HELP
                )
            elif not assistant.is_open(now := self._clock()):
                if not await self._after_hours(conversation, questions, assistant, now):
                    outcome = Outcome.CLOSED
            elif scope := await self._limit_reached(conversation):
                outcome = await self._rate_limited(questions, scope)
            else:
                outcome = await self._answer_burst(conversation, questions, assistant)
        return outcome

    async def _after_hours(
        self,
        conversation: ConversationView,
        questions: Sequence[Waiting],
        assistant: Assistant,
        now: dt.datetime,
    ) -> bool:
        """The profile's after-hours reply, once per closed period; later messages of the period
        (or all, without an `after_hours_reply`) are `not_answered`. True when a reply is owed."""
        if assistant.after_hours_reply is None or assistant.hours is None:
            await outbox.mark_inbound(
                self._engine,
                [m.id for m in questions],
                InboundState.NOT_ANSWERED,
                error=fixed.CLOSED,
            )
            return False
        reply = self._answer(
            conversation,
            questions,
            assistant.after_hours_reply,
            Author.FIXED,
            FixedText.AFTER_HOURS,
        )
        await self._greet(conversation, questions, assistant)
        return await fixed.store_after_hours(
            self._engine, reply, assistant.hours.closed_period(now)
        )

    async def _answer_burst(
        self, conversation: ConversationView, questions: list[Waiting], assistant: Assistant
    ) -> Outcome:
        """One model call for the questions; when the person wrote more before its answer was
        stored, the answer is dropped (its call recorded `superseded`) and the model asked
        again with the newer messages too, at most `MAX_RETAKES` times, after which the answer
        is stored whatever came meanwhile (SPEC §12). One reply per burst, in order."""
        claimed = len(questions)
        for retake in range(MAX_RETAKES + 1):
            completion, call_id = await self._ask_model(conversation, questions, assistant)
            stored = await self._store(
                conversation,
                questions,
                completion.text,
                assistant,
                Author.MODEL,
                call_id,
                interruptible=retake < MAX_RETAKES,
                taken_over=[m.id for m in questions[claimed:]],
            )
            if stored:
                return Outcome.ANSWERED
            newer = await bursts.newer_waiting(self._engine, conversation.id, questions[-1].id)
            questions = [*questions, *await conversations.waiting_messages(self._engine, newer)]
            if scope := await self._limit_reached(conversation):
                return await self._rate_limited(questions, scope)
        raise AssertionError("the last retake is stored unconditionally")

    async def _rate_limited(self, questions: Sequence[Waiting], scope: str) -> Outcome:
        await outbox.mark_inbound(
            self._engine, [m.id for m in questions], InboundState.RATE_LIMITED
        )
        metrics.count_rate_limited(scope, len(questions))
        return Outcome.RATE_LIMITED

    # ------------------------------------------------------------ limits

    async def _limit_reached(self, conversation: ConversationView) -> str | None:
        """Which limit forbids a model call now, "conversation" (`REPLY_RATE_LIMIT`) or
        "global" (`MODEL_CALLS_LIMIT`), or None; passing the global one takes a place in its
        window, so only ask right before the call."""
        if await self._over_rate_limit(conversation):
            return "conversation"
        if not await self._budget.take():
            return "global"
        return None

    async def _over_rate_limit(self, conversation: ConversationView) -> bool:
        """`REPLY_RATE_LIMIT`, counted from the reply calls read with the job's state."""
        limit = self._settings.rate_limit
        if conversation.recent_model_calls < limit.count:
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

    async def _prompt(
        self, conversation: ConversationView, questions: Sequence[Waiting], assistant: Assistant
    ) -> list[PromptMessage]:
        """The profile's system prompt, the summary (summary memory), the history bounded by
        count and tokens (`conversation.build_prompt`), then the questions with their
        attachments (`Attachments.new_turns`: fetched now, images for this turn only)."""
        new = await self._attachments.new_turns(Channel(conversation.channel), questions)
        summary, history = await self._memory.history(
            conversation.id, [m.id for m in questions], new, assistant
        )
        prompt = build_prompt(
            assistant.system_prompt,
            self._channels[Channel(conversation.channel)].style,
            history,
            new,
            max_messages=assistant.history_messages,
            max_tokens=assistant.history_tokens - memory.summary_cost(summary),
        )
        return memory.with_summary(prompt, summary)

    async def _ask_model(
        self, conversation: ConversationView, questions: Sequence[Waiting], assistant: Assistant
    ) -> tuple[Completion, int]:
        prompt = await self._prompt(conversation, questions, assistant)
        options = CallOptions(assistant.model, assistant.temperature, assistant.max_tokens)
        try:
            return await self._caller.call(
                conversation.id,
                prompt,
                options,
                purpose=CallPurpose.REPLY,
                profile=assistant.profile,
            )
        except ModelError as error:
            if error.retryable:
                raise RetryLater(str(error), error.retry_after_s) from error
            raise GiveUp(str(error)) from error

    # ------------------------------------------------------------ storing

    async def _store(
        self,
        conversation: ConversationView,
        answered: Sequence[Waiting],
        text: str,
        assistant: Assistant,
        author: Author,
        call_id: int | None = None,
        kind: FixedText | None = None,
        *,
        interruptible: bool = False,
        taken_over: Sequence[int] = (),
    ) -> bool:
        """The reply's parts and the answered messages' new state, in one transaction; the
        profile's greeting first when this is the conversation's first reply. False when
        `interruptible` and a newer message of the person waits (the answer is not stored)."""
        answer = self._answer(conversation, answered, text, author, kind, call_id)
        answer = dataclasses.replace(answer, interruptible=interruptible, taken_over=taken_over)
        await self._greet(conversation, answered, assistant)
        stored = await outbox.store_answer(self._engine, answer)
        if stored is outbox.Stored.ANSWERED_ELSEWHERE:
            # Another worker answered them while this one was stalled past its lease.
            raise Superseded(f"messages {[m.id for m in answered]} were answered elsewhere")
        return stored is outbox.Stored.STORED

    async def _greet(
        self, conversation: ConversationView, answered: Sequence[Waiting], assistant: Assistant
    ) -> None:
        """The greeting, its own message, exactly the configured text, before the first reply of
        the conversation and never again (`store_greeting` checks, in its transaction)."""
        if assistant.greeting:
            greeting = self._answer(
                conversation, answered, assistant.greeting, Author.FIXED, FixedText.GREETING
            )
            await fixed.store_greeting(self._engine, greeting)

    def _answer(
        self,
        conversation: ConversationView,
        answered: Sequence[Waiting],
        text: str,
        author: Author,
        kind: FixedText | None = None,
        call_id: int | None = None,
    ) -> outbox.Answer:
        """A reply to `answered`, cut to the channel's limits, in its envelope."""
        channel = Channel(conversation.channel)
        last = answered[-1]
        subject, headers = self._channels[channel].reply_envelope(
            last.subject, last.headers, conversation.local_address
        )
        return outbox.Answer(
            conversation_id=conversation.id,
            channel=conversation.channel,
            answered_ids=[m.id for m in answered],
            # A model may answer with NUL or stray control characters: PostgreSQL refuses NUL.
            parts=self._channels[channel].split(storable.text(text)),
            author=author,
            subject=subject,
            headers=headers,
            call_id=call_id,
            fixed_kind=kind.value if kind else None,
        )
