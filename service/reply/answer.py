"""Writing the reply: fixed texts (HELP), the limits (`REPLY_RATE_LIMIT` per conversation,
`MODEL_CALLS_LIMIT` for the deployment), the model call and its record. The answer is stored,
cut to the channel's limits, before anything is sent."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Sequence

from service import metrics, storable
from service.assistant import Completion, ModelError
from service.conversation import HELP_TEXT, build_prompt, history_rows_for, join_parts
from service.db import utcnow
from service.reply.flow import GiveUp, Outcome, ReplyContext, RetryLater, Superseded
from service.store import bursts, conversations, outbox
from service.store.budget import ModelCallBudget
from service.store.conversations import ConversationView, Waiting
from service.types import Author, Channel, InboundState, Intent, Sender, Turn

log = logging.getLogger(__name__)

MAX_RETAKES = 2  # SPEC §12: a reply's model call is asked again at most twice for newer messages


class Answerer:
    def __init__(self, context: ReplyContext) -> None:
        self._engine = context.engine
        self._settings = context.settings
        self._model = context.model
        self._channels = context.channels
        self._warned_until: dict[int, float] = {}
        settings = context.settings
        self._budget = ModelCallBudget(
            context.engine, settings.model_calls_cap, settings.model_calls_limit
        )

    async def answer(self, conversation: ConversationView, waiting: list[Waiting]) -> Outcome:
        """HELP with its fixed text, the rest with one model call; in the order they came."""
        helps = [m for m in waiting if m.intent == Intent.HELP.value]
        questions = [m for m in waiting if m.intent != Intent.HELP.value]
        groups = sorted((group for group in (helps, questions) if group), key=lambda g: g[0].id)
        outcome = Outcome.ANSWERED
        for group in groups:
            if group is helps:
                await self._store(conversation, helps, HELP_TEXT, Author.FIXED)
            elif scope := await self._limit_reached(conversation):
                outcome = await self._rate_limited(questions, scope)
            else:
                outcome = await self._answer_burst(conversation, questions)
        return outcome

    async def _answer_burst(
        self, conversation: ConversationView, questions: list[Waiting]
    ) -> Outcome:
        """One model call for the questions; when the person wrote more before its answer was
        stored, the answer is dropped (its call recorded `superseded`) and the model asked
        again with the newer messages too, at most `MAX_RETAKES` times, after which the answer
        is stored whatever came meanwhile (SPEC §12). One reply per burst, in order."""
        claimed = len(questions)
        for retake in range(MAX_RETAKES + 1):
            completion, call_id = await self._ask_model(conversation, questions)
            taken_over = [m.id for m in questions[claimed:]]
            interruptible = retake < MAX_RETAKES
            stored = await self._store(
                conversation,
                questions,
                completion.text,
                Author.MODEL,
                call_id,
                interruptible,
                taken_over,
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
        if await self._over_rate_limit(conversation.id):
            return "conversation"
        if not await self._budget.take():
            return "global"
        return None

    async def _over_rate_limit(self, conversation_id: int) -> bool:
        limit = self._settings.rate_limit
        since = utcnow() - dt.timedelta(seconds=limit.window_s)
        if (
            await conversations.model_calls_since(self._engine, conversation_id, since)
            < limit.count
        ):
            return False
        now = utcnow().timestamp()
        if self._warned_until.get(conversation_id, 0) < now:
            self._warned_until[conversation_id] = now + limit.window_s
            log.warning(
                "conversation %s reached REPLY_RATE_LIMIT (%s): not answering",
                conversation_id,
                self._settings.reply_rate_limit,
            )
        return True

    # ------------------------------------------------------------ the model

    async def _prompt(
        self, conversation: ConversationView, questions: Sequence[Waiting]
    ) -> list[dict[str, str]]:
        """History bounded by count and tokens (`conversation.build_prompt`), then the questions."""
        max_messages = self._settings.assistant_history_messages
        rows = await conversations.history_rows(
            self._engine, conversation.id, [m.id for m in questions], history_rows_for(max_messages)
        )
        return build_prompt(
            self._settings.assistant_system_prompt,
            self._channels[Channel(conversation.channel)].style,
            join_parts(rows),
            [Turn(Sender.USER, m.body) for m in questions],
            max_messages=max_messages,
            max_tokens=self._settings.assistant_history_tokens,
        )

    async def _ask_model(
        self, conversation: ConversationView, questions: Sequence[Waiting]
    ) -> tuple[Completion, int]:
        prompt = await self._prompt(conversation, questions)
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
            await self._record_failed_call(conversation.id, error)
            if error.retryable:
                raise RetryLater(str(error), error.retry_after_s) from exc
            raise GiveUp(str(error)) from exc
        return completion, await self._record_call(conversation.id, completion)

    async def _record_call(self, conversation_id: int, completion: Completion) -> int:
        metrics.observe_model_call(
            completion.latency_ms / 1000,
            True,
            completion.prompt_tokens,
            completion.completion_tokens,
        )
        return await outbox.record_call(
            self._engine,
            outbox.CallRecord(
                conversation_id=conversation_id,
                model=completion.model,
                generation_params=completion.params,
                processing_time=completion.latency_ms,
                ok=True,
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                total_tokens=completion.total_tokens,
            ),
        )

    async def _record_failed_call(self, conversation_id: int, error: ModelError) -> None:
        metrics.observe_model_call(error.latency_ms / 1000, False, None, None)
        await outbox.record_call(
            self._engine,
            outbox.CallRecord(
                conversation_id=conversation_id,
                model=self._model.name,
                generation_params=self._model.params,
                processing_time=error.latency_ms,
                ok=False,
                error=str(error),
            ),
        )

    # ------------------------------------------------------------ storing

    async def _store(
        self,
        conversation: ConversationView,
        answered: Sequence[Waiting],
        text: str,
        author: Author,
        call_id: int | None = None,
        interruptible: bool = False,
        taken_over: Sequence[int] = (),
    ) -> bool:
        """The reply's parts and the answered messages' new state, in one transaction; False
        when `interruptible` and a newer message of the person waits (nothing stored)."""
        channel = Channel(conversation.channel)
        last = answered[-1]
        subject, headers = self._channels[channel].reply_envelope(
            last.subject, last.headers, conversation.local_address
        )
        answer = outbox.Answer(
            conversation_id=conversation.id,
            channel=conversation.channel,
            answered_ids=[m.id for m in answered],
            # A model may answer with NUL or stray control characters: PostgreSQL refuses NUL.
            parts=self._channels[channel].split(storable.text(text)),
            author=author,
            subject=subject,
            headers=headers,
            call_id=call_id,
            interruptible=interruptible,
            taken_over=taken_over,
        )
        stored = await outbox.store_answer(self._engine, answer)
        if stored is outbox.Stored.ANSWERED_ELSEWHERE:
            # Another worker answered them while this one was stalled past its lease.
            raise Superseded(f"messages {[m.id for m in answered]} were answered elsewhere")
        return stored is outbox.Stored.STORED
