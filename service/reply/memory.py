"""The history a reply's prompt carries: the window (`memory = "window"`), or the rolling
summary plus the turns after its watermark (`memory = "summary"`, SPEC §12).

In summary memory, when the turns after the watermark no longer fit the window, all but the
newest `SUMMARY_KEEP_MESSAGES` are folded into the summary by one model call of its own
(`purpose = "summary"`, its own instruction, a place in `MODEL_CALLS_LIMIT`'s budget), stored
with the id of the last message it covers, before the reply's call. The summary is never sent
to the person. A summary call that fails or finds no place in the budget never blocks the
reply: the reply uses the window (and the summary so far).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from service import memory
from service.assistant import CallOptions, ModelError
from service.conversation import history_rows_for, join_parts
from service.profiles import Assistant
from service.reply.calls import ModelCaller
from service.store import AsyncEngine, conversations
from service.store import memory as memory_store
from service.store.budget import ModelCallBudget
from service.store.memory import Summary
from service.store.reply_state import History, HistoryWanted
from service.types import CallPurpose, Turn

log = logging.getLogger(__name__)


class Memory:
    def __init__(
        self, engine: AsyncEngine, caller: ModelCaller, budget: ModelCallBudget, keep: int
    ) -> None:
        self._engine = engine
        self._caller = caller
        self._budget = budget
        self._keep = keep

    def wanted(self, assistant: Assistant) -> HistoryWanted:
        """The history a reply of this profile shows: read with the job's state when it can."""
        if assistant.memory != "summary":
            return HistoryWanted(history_rows_for(assistant.history_messages), False)
        return HistoryWanted(history_rows_for(max(assistant.history_messages, self._keep)), True)

    async def history(
        self,
        conversation_id: int,
        new_ids: Sequence[int],
        new: Sequence[Turn],
        assistant: Assistant,
        known: History | None = None,
    ) -> tuple[str | None, list[Turn]]:
        """The summary (None in window memory or before the first fold) and the earlier turns
        for the prompt, oldest first; `build_prompt` still bounds them. `known`: as read with
        the job's state for these `new_ids` (else read here)."""
        plan = self.wanted(assistant)
        if known is None:
            known = await self._read(conversation_id, new_ids, plan)
        if not plan.after_summary:
            return None, join_parts(known.rows)
        summary, rows = known.summary, known.rows
        fold = memory.plan_fold(
            rows,
            new,
            summary.text,
            max_messages=assistant.history_messages,
            max_tokens=assistant.history_tokens,
            keep=self._keep,
            new_ids=new_ids,
        )
        if fold is None:
            return summary.text, join_parts(rows)
        folded = await self._fold(conversation_id, summary.text, fold, assistant)
        if folded is None:
            return summary.text, join_parts(rows)  # the window, as before
        return folded, fold.kept

    async def _read(
        self, conversation_id: int, new_ids: Sequence[int], plan: HistoryWanted
    ) -> History:
        summary = Summary()
        if plan.after_summary:
            summary = await memory_store.read_summary(self._engine, conversation_id)
        rows = await conversations.history_rows(
            self._engine, conversation_id, new_ids, plan.rows, after_id=summary.through_id
        )
        return History(summary, rows)

    async def _fold(
        self,
        conversation_id: int,
        previous: str | None,
        fold: memory.Fold,
        assistant: Assistant,
    ) -> str | None:
        """The new summary, stored; None when the call could not be made or failed."""
        if not await self._budget.take():
            return None
        options = CallOptions(
            model=assistant.model, max_tokens=memory.summary_max_tokens(assistant.history_tokens)
        )
        try:
            completion, call = await self._caller.call(
                conversation_id,
                memory.summary_request(previous, fold.folded),
                options,
                purpose=CallPurpose.SUMMARY,
                profile=assistant.profile,
            )
        except ModelError as exc:
            log.warning(
                "conversation %s: summary call failed (%s); the reply uses the window",
                conversation_id,
                exc,
            )
            return None
        text = memory.clip_summary(completion.text, assistant.history_tokens)
        stored = memory_store.Summary(text, fold.through_id)
        await memory_store.save_summary(self._engine, conversation_id, stored, call)
        return text
