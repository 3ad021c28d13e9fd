"""Writing the reply: fixed texts (HELP), the limits (`REPLY_RATE_LIMIT` per conversation,
`MODEL_CALLS_LIMIT` for the deployment), the model call and its record. The answer is stored,
cut to the channel's limits, before anything is sent."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from service import metrics, storable
from service.assistant import Completion, ModelError
from service.conversation import HELP_TEXT, build_prompt, join_parts
from service.reply.flow import Answered, GiveUp, Outcome, ReplyContext, RetryLater, Superseded
from service.store import outbox
from service.store.budget import ModelCallBudget
from service.store.conversations import ConversationView, Waiting
from service.types import Author, Channel, InboundState, Intent, Sender, Turn

log = logging.getLogger(__name__)


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

    async def answer(self, conversation: ConversationView, waiting: list[Waiting]) -> Answered:
        """HELP with its fixed text, the rest with one model call; in the order they came.
        The first part stored is also moved to `sending`, in the same transaction."""
        helps = [m for m in waiting if m.intent == Intent.HELP.value]
        questions = [m for m in waiting if m.intent != Intent.HELP.value]
        groups = sorted((group for group in (helps, questions) if group), key=lambda g: g[0].id)
        outcome = Outcome.ANSWERED
        parts: list[outbox.Part] = []
        for group in groups:
            if group is helps:
                parts += await self._store(conversation, helps, HELP_TEXT, Author.FIXED, not parts)
            elif scope := await self._limit_reached(conversation):
                await outbox.mark_inbound(
                    self._engine, [m.id for m in questions], InboundState.RATE_LIMITED
                )
                metrics.count_rate_limited(scope, len(questions))
                outcome = Outcome.RATE_LIMITED
            else:
                completion, call = await self._ask_model(conversation, questions)
                parts += await self._store(
                    conversation, questions, completion.text, Author.MODEL, not parts, call
                )
        return Answered(outcome, parts)

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
        """`REPLY_RATE_LIMIT`, counted from the model calls read with the job's state."""
        limit = self._settings.rate_limit
        if conversation.recent_model_calls < limit.count:
            return False
        now = time.time()
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
        self, conversation: ConversationView, questions: Sequence[Waiting]
    ) -> list[dict[str, str]]:
        """History bounded by count and tokens (`conversation.build_prompt`), then the questions.
        The history rows were read with the job's state (`conversation.history`)."""
        max_messages = self._settings.assistant_history_messages
        return build_prompt(
            self._settings.assistant_system_prompt,
            self._channels[Channel(conversation.channel)].style,
            join_parts(conversation.history),
            [Turn(Sender.USER, m.body) for m in questions],
            max_messages=max_messages,
            max_tokens=self._settings.assistant_history_tokens,
        )

    async def _ask_model(
        self, conversation: ConversationView, questions: Sequence[Waiting]
    ) -> tuple[Completion, outbox.CallRecord]:
        """The model's answer and the record of its call (stored with the answer)."""
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
        return completion, self._call_record(conversation.id, completion)

    def _call_record(self, conversation_id: int, completion: Completion) -> outbox.CallRecord:
        metrics.observe_model_call(
            completion.latency_ms / 1000,
            True,
            completion.prompt_tokens,
            completion.completion_tokens,
        )
        return outbox.CallRecord(
            conversation_id=conversation_id,
            model=completion.model,
            generation_params=completion.params,
            processing_time=completion.latency_ms,
            ok=True,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            total_tokens=completion.total_tokens,
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
        start_sending: bool,
        call: outbox.CallRecord | None = None,
    ) -> list[outbox.Part]:
        """The reply's parts, the answered messages' new state and the model call's record,
        in one transaction (`start_sending`: the first part's compare-and-set too)."""
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
            call=call,
            start_sending=start_sending,
        )
        stored = await outbox.store_answer(self._engine, answer)
        if stored is None:
            # Another worker answered them while this one was stalled past its lease.
            raise Superseded(f"messages {[m.id for m in answered]} were answered elsewhere")
        return stored.parts
