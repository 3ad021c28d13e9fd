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
from dataclasses import dataclass

from service import memory, metrics, storable
from service.assistant import CallOptions, Completion, ModelError
from service.byte_budget import Held
from service.conversation import HELP_TEXT, PromptMessage, build_prompt
from service.db import utcnow
from service.profiles import Assistant, from_variables, no_profiles
from service.reply.attachments import Attachments
from service.reply.calls import ModelCaller
from service.reply.flow import Answered, GiveUp, Outcome, ReplyContext, RetryLater, Superseded
from service.reply.memory import Memory
from service.store import bursts, conversations, fixed, outbox
from service.store.budget import ModelCallBudget
from service.store.conversations import ConversationView, Waiting
from service.store.reply_state import History, HistoryWanted
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


@dataclass(frozen=True)
class _Store:
    """How a job stores its next reply: for which profile, with the greeting checked for
    (`greet`) and the first part's compare-and-set (`start_sending`: nothing stored before it)."""

    assistant: Assistant
    greet: bool
    start_sending: bool


class Answerer:
    def __init__(self, context: ReplyContext) -> None:
        self._engine = context.engine
        self._settings = context.settings
        self._channels = context.channels
        self._attachments = Attachments(context)
        self._warned_until: dict[int, float] = {}
        settings = context.settings
        self._rate_limit = settings.rate_limit  # parsed once: it is read on every reply
        self._budget = ModelCallBudget(
            context.engine, settings.model_calls_cap, settings.model_calls_limit
        )
        self._profiles = context.profiles or no_profiles(from_variables(settings))
        self._clock = context.clock
        self._caller = ModelCaller(context.engine, context.model, settings.assistant_timeout_s)
        self._memory = Memory(
            context.engine, self._caller, self._budget, settings.summary_keep_messages
        )

    def history_wanted(self, local_address: str) -> HistoryWanted:
        """What history the job's state read fetches for a conversation at this address."""
        return self._memory.wanted(self._profiles.pick(local_address))

    async def answer(
        self,
        conversation: ConversationView,
        waiting: list[Waiting],
        history: History | None = None,
        *,
        replied: bool = False,
    ) -> Answered:
        """HELP with its fixed text, the rest with one model call (or, outside the profile's
        hours, its after-hours reply); in the order they came. `history`: read with the job's
        state; `replied`: the conversation is known to have an assistant message (no greeting
        owed, none checked for). The first part stored is also moved to `sending`."""
        assistant = self._profiles.pick(conversation.local_address)
        helps = [m for m in waiting if m.intent == Intent.HELP.value]
        questions = [m for m in waiting if m.intent != Intent.HELP.value]
        groups = sorted((group for group in (helps, questions) if group), key=lambda g: g[0].id)
        outcome = Outcome.ANSWERED
        parts: list[outbox.Part] = []
        for group in groups:
            greet = assistant.greeting is not None and not (replied or parts)
            store = _Store(assistant, greet, start_sending=not parts)
            if group is helps:
                parts += (
                    await self._store(
                        conversation, helps, HELP_TEXT, store, Author.FIXED, kind=FixedText.HELP
                    )
                    or []
                )
            elif not assistant.is_open(now := self._clock()):
                stored = await self._after_hours(conversation, questions, store, now)
                outcome = outcome if stored else Outcome.CLOSED
                parts += stored
            elif scope := await self._limit_reached(conversation):
                outcome = await self._rate_limited(questions, scope)
            else:
                answered = await self._answer_burst(conversation, questions, store, history)
                outcome, parts = answered.outcome, parts + answered.parts
        return Answered(outcome, parts)

    async def _after_hours(
        self,
        conversation: ConversationView,
        questions: Sequence[Waiting],
        store: _Store,
        now: dt.datetime,
    ) -> list[outbox.Part]:
        """The profile's after-hours reply, once per closed period; later messages of the period
        (or all, without an `after_hours_reply`) are `not_answered`. Returns what it stored."""
        assistant = store.assistant
        if assistant.after_hours_reply is None or assistant.hours is None:
            await outbox.mark_inbound(
                self._engine,
                [m.id for m in questions],
                InboundState.NOT_ANSWERED,
                error=fixed.CLOSED,
            )
            return []
        reply = self._answer(
            conversation,
            questions,
            assistant.after_hours_reply,
            Author.FIXED,
            FixedText.AFTER_HOURS,
        )
        reply = dataclasses.replace(reply, greeting=self._greeting(conversation, questions, store))
        return await fixed.store_after_hours(
            self._engine,
            reply,
            assistant.hours.closed_period(now),
            start_sending=store.start_sending,
        )

    async def _answer_burst(
        self,
        conversation: ConversationView,
        questions: list[Waiting],
        store: _Store,
        history: History | None,
    ) -> Answered:
        """One model call for the questions; when the person wrote more before its answer was
        stored, the answer is dropped (its call recorded `superseded`) and the model asked
        again with the newer messages too, at most `MAX_RETAKES` times, after which the answer
        is stored whatever came meanwhile (SPEC §12). One reply per burst, in order. `history`
        (read with the job's state) serves the first call; a retake reads its own."""
        claimed = len(questions)
        for retake in range(MAX_RETAKES + 1):
            completion, call = await self._ask_model(
                conversation, questions, store.assistant, history
            )
            history = None
            stored = await self._store(
                conversation,
                questions,
                completion.text,
                store,
                Author.MODEL,
                call,
                # An answer is dropped only for a retake the person's limit allows: past it,
                # the answer in hand goes out and the newer texts wait for their own job.
                interruptible=retake < MAX_RETAKES
                and self._within_rate_limit(conversation, made=retake + 1),
                taken_over=[m.id for m in questions[claimed:]],
            )
            if stored is not None:
                return Answered(Outcome.ANSWERED, stored)
            newer = await bursts.newer_waiting(self._engine, conversation.id, questions[-1].id)
            questions = [*questions, *await conversations.waiting_messages(self._engine, newer)]
            if scope := await self._limit_reached(conversation, made=retake + 1):
                return Answered(await self._rate_limited(questions, scope), [])
        raise AssertionError("the last retake is stored unconditionally")

    async def _rate_limited(self, questions: Sequence[Waiting], scope: str) -> Outcome:
        await outbox.mark_inbound(
            self._engine, [m.id for m in questions], InboundState.RATE_LIMITED
        )
        metrics.count_rate_limited(scope, len(questions))
        return Outcome.RATE_LIMITED

    # ------------------------------------------------------------ limits

    async def _limit_reached(self, conversation: ConversationView, made: int = 0) -> str | None:
        """Which limit forbids a model call now, "conversation" (`REPLY_RATE_LIMIT`) or
        "global" (`MODEL_CALLS_LIMIT`), or None; passing the global one takes a place in its
        window, so only ask right before the call. `made`: reply calls this job has made
        since its state was read."""
        if await self._over_rate_limit(conversation, made):
            return "conversation"
        if not await self._budget.take():
            return "global"
        return None

    def _within_rate_limit(self, conversation: ConversationView, made: int) -> bool:
        return conversation.recent_model_calls + made < self._rate_limit.count

    async def _over_rate_limit(self, conversation: ConversationView, made: int) -> bool:
        """`REPLY_RATE_LIMIT`, counted from the reply calls read with the job's state plus the
        ones this job made since."""
        limit = self._rate_limit
        if self._within_rate_limit(conversation, made):
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
        self,
        conversation: ConversationView,
        questions: Sequence[Waiting],
        assistant: Assistant,
        history: History | None,
        held: Held,
    ) -> list[PromptMessage]:
        """The profile's system prompt, the summary (summary memory), the history bounded by
        count and tokens (`conversation.build_prompt`), then the questions with their
        attachments (`Attachments.new_turns`: fetched now, images for this turn only)."""
        new = await self._attachments.new_turns(Channel(conversation.channel), questions, held)
        summary, turns = await self._memory.history(
            conversation.id, [m.id for m in questions], new, assistant, history
        )
        prompt = build_prompt(
            assistant.system_prompt,
            self._channels[Channel(conversation.channel)].style,
            turns,
            new,
            max_messages=assistant.history_messages,
            max_tokens=assistant.history_tokens - memory.summary_cost(summary),
        )
        return memory.with_summary(prompt, summary)

    async def _ask_model(
        self,
        conversation: ConversationView,
        questions: Sequence[Waiting],
        assistant: Assistant,
        history: History | None,
    ) -> tuple[Completion, outbox.CallRecord]:
        """The model's answer and its call's record, stored with the answer. The pictures'
        memory is held until the call is over (`Attachments.held_for`)."""
        options = CallOptions(assistant.model, assistant.temperature, assistant.max_tokens)
        try:
            async with self._attachments.held_for(questions) as held:
                prompt = await self._prompt(conversation, questions, assistant, history, held)
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
        store: _Store,
        author: Author,
        call: outbox.CallRecord | None = None,
        kind: FixedText | None = None,
        *,
        interruptible: bool = False,
        taken_over: Sequence[int] = (),
    ) -> list[outbox.Part] | None:
        """The reply's parts and the answered messages' new state, in one transaction with the
        model call's record, the profile's greeting first when owed and the first part's
        compare-and-set (`outbox.store_reply`). Returns the parts stored, in the order they go
        out; None when `interruptible` and a newer message of the person waits (nothing stored,
        the call recorded `superseded`)."""
        answer = self._answer(conversation, answered, text, author, kind)
        answer = dataclasses.replace(
            answer,
            interruptible=interruptible,
            taken_over=taken_over,
            call=call,
            greeting=self._greeting(conversation, answered, store),
            start_sending=store.start_sending,
        )
        stored = await outbox.store_reply(self._engine, answer)
        if stored.outcome is outbox.Stored.ANSWERED_ELSEWHERE:
            # Another worker answered them while this one was stalled past its lease.
            raise Superseded(f"messages {[m.id for m in answered]} were answered elsewhere")
        return stored.parts if stored.outcome is outbox.Stored.STORED else None

    def _greeting(
        self, conversation: ConversationView, answered: Sequence[Waiting], store: _Store
    ) -> outbox.Answer | None:
        """The greeting, its own message, exactly the configured text, before the first reply of
        the conversation and never again (`outbox.insert_greeting` checks, in the reply's
        transaction); None when none is configured or the conversation is known to have one."""
        if not store.greet or store.assistant.greeting is None:
            return None
        return self._answer(
            conversation, answered, store.assistant.greeting, Author.FIXED, FixedText.GREETING
        )

    def _answer(
        self,
        conversation: ConversationView,
        answered: Sequence[Waiting],
        text: str,
        author: Author,
        kind: FixedText | None = None,
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
            fixed_kind=kind.value if kind else None,
        )
