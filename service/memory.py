"""Summary memory's pure rules (SPEC §12): when old turns are folded into the rolling summary,
which ones, what the summarising call is asked, and how the summary rides in a prompt.

The window drops a conversation's oldest turns once it no longer fits `history_messages` or
`history_tokens`; in summary memory those turns are first folded into a summary (all but the
newest `SUMMARY_KEEP_MESSAGES`), which later prompts carry as a second system message, within
the same token budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.conversation import StoredTurn, estimate_tokens, group_parts, turn_of, turn_tokens
from service.types import Sender, Turn

SUMMARY_PREFIX = "Summary of the earlier conversation: "
SUMMARY_SYSTEM_PROMPT = (
    "You keep the memory of a conversation between a person and an assistant that answers "
    "them by text message or email. Rewrite the summary so far together with the new turns "
    "into one updated summary, in the third person, as short plain sentences. Keep every fact "
    "that may matter later: the person's name and details, orders, dates, amounts, addresses, "
    "preferences, promises made and questions still open. Drop greetings and small talk. "
    "Answer with the summary only."
)
SUMMARY_SHARE = 4  # a summary may take at most a quarter of `history_tokens`


@dataclass(frozen=True)
class Fold:
    """The turns to fold into the summary, the watermark they end at, and the turns kept."""

    folded: list[Turn]
    through_id: int
    kept: list[Turn]


def plan_fold(
    rows: Sequence[StoredTurn],
    new: Sequence[Turn],
    summary: str | None,
    *,
    max_messages: int,
    max_tokens: int,
    keep: int,
    new_ids: Sequence[int] = (),
) -> Fold | None:
    """A fold when the history after the watermark (`rows`) no longer fits the window beside
    the summary and the new turns (`new`, stored as `new_ids`); None when it fits or nothing
    older than the kept turns is left."""
    groups = group_parts(rows)
    cost = summary_cost(summary) + sum(turn_tokens(t) for t in new)  # images included
    cost += sum(estimate_tokens(row.body) for row in rows)
    if len(groups) <= max_messages and cost <= max_tokens:
        return None
    # A reply stored after the new messages arrived (a burst) is history, but folding it would
    # move the watermark past the new messages, and they would never be read again.
    foldable = sum(1 for g in groups if not new_ids or g[-1].id < min(new_ids))
    cut = min(len(groups) - _keep_within(groups, keep, max_tokens), foldable)
    if cut <= 0 or max_messages == 0:
        return None
    folded, kept = groups[:cut], groups[cut:]
    return Fold([turn_of(g) for g in folded], folded[-1][-1].id, [turn_of(g) for g in kept])


def _keep_within(groups: Sequence[Sequence[StoredTurn]], keep: int, max_tokens: int) -> int:
    """How many of the newest turns stay word for word: at most `keep`, and no more than fit
    half of what the budget leaves beside a summary, so long turns (email) do not make every
    reply fold again."""
    room = (max_tokens - summary_max_tokens(max_tokens)) // 2
    kept, used = 0, 0
    for group in reversed(groups[-keep:] if keep else []):
        used += sum(estimate_tokens(row.body) for row in group)
        if used > room:
            break
        kept += 1
    return kept


def summary_cost(summary: str | None) -> int:
    """What the summary's system message takes of the history's token budget."""
    return estimate_tokens(SUMMARY_PREFIX + summary) if summary else 0


def summary_max_tokens(history_tokens: int) -> int:
    """The longest summary the model is asked for, so summary and kept turns fit together."""
    return max(50, history_tokens // SUMMARY_SHARE)


def clip_summary(text: str, history_tokens: int) -> str:
    """A summary cut to its share of the budget, should the model overrun `max_tokens`."""
    limit = summary_max_tokens(history_tokens) * 4
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0]


def summary_request(previous: str | None, turns: Sequence[Turn]) -> list[dict[str, str]]:
    """The summarising call's messages: its own instruction, the summary so far, the turns."""
    lines = [f"{'Person' if t.sender is Sender.USER else 'Assistant'}: {t.body}" for t in turns]
    content = f"Summary so far: {previous or '(none yet)'}\n\nNew turns:\n" + "\n".join(lines)
    return [
        {"role": "system", "content": SUMMARY_SYSTEM_PROMPT},
        {"role": "user", "content": content},
    ]


def with_summary(prompt: list[dict[str, str]], summary: str | None) -> list[dict[str, str]]:
    """The prompt with the summary as a second system message, before the kept turns."""
    if not summary:
        return prompt
    return [prompt[0], {"role": "system", "content": SUMMARY_PREFIX + summary}, *prompt[1:]]
