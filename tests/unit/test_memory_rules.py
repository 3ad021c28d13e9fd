"""Summary memory's pure rules (service/memory.py): when to fold, what is folded and kept, the
watermark, the summary inside the prompt, and what it costs in model calls per 100 turns."""

from __future__ import annotations

from service.conversation import StoredTurn, build_prompt, estimate_tokens
from service.memory import (
    SUMMARY_PREFIX,
    SUMMARY_SYSTEM_PROMPT,
    plan_fold,
    summary_cost,
    summary_request,
    with_summary,
)
from service.types import Sender, Turn


def rows(count: int, start: int = 1, size: int = 40) -> list[StoredTurn]:
    """`count` alternating stored turns (user, assistant, …) with ids from `start`."""
    return [
        StoredTurn(
            Sender.USER if i % 2 == 0 else Sender.ASSISTANT,
            f"turn {start + i} " + "x" * size,
            None if i % 2 == 0 else start + i - 1,
            start + i,
        )
        for i in range(count)
    ]


NEW = [Turn(Sender.USER, "the newest question")]


def test_a_history_that_fits_is_not_folded() -> None:
    assert plan_fold(rows(8), NEW, None, max_messages=20, max_tokens=4000, keep=10) is None


def test_past_the_count_all_but_the_newest_kept_turns_are_folded_up_to_a_watermark() -> None:
    fold = plan_fold(rows(22), NEW, None, max_messages=20, max_tokens=4000, keep=10)
    assert fold is not None
    assert len(fold.folded) == 12 and len(fold.kept) == 10
    assert fold.through_id == 12  # the last folded row's id
    assert fold.folded[0].body.startswith("turn 1 ") and fold.kept[0].body.startswith("turn 13 ")


def test_past_the_token_budget_it_folds_too_and_the_summary_counts_against_it() -> None:
    history = rows(8, size=400)  # ~8 x 105 tokens
    assert plan_fold(history, NEW, None, max_messages=20, max_tokens=800, keep=4) is not None
    assert plan_fold(history, NEW, None, max_messages=20, max_tokens=2000, keep=4) is None
    long_summary = "s" * 5000
    assert plan_fold(history, NEW, long_summary, max_messages=20, max_tokens=2000, keep=4)


def test_a_split_reply_is_folded_or_kept_whole() -> None:
    history = [
        StoredTurn(Sender.USER, "q1", None, 1),
        StoredTurn(Sender.ASSISTANT, "part a", 1, 2),
        StoredTurn(Sender.ASSISTANT, "part b", 1, 3),
        StoredTurn(Sender.USER, "q2", None, 4),
        StoredTurn(Sender.ASSISTANT, "a2", 4, 5),
    ]
    fold = plan_fold(history, NEW, None, max_messages=3, max_tokens=4000, keep=2)
    assert fold is not None
    assert [t.body for t in fold.folded] == ["q1", "part a part b"]
    assert fold.through_id == 3


def test_nothing_to_fold_when_only_the_kept_turns_are_left() -> None:
    # Over the count, but no turn older than the kept ones: the window trims as before.
    assert plan_fold(rows(6), NEW, None, max_messages=4, max_tokens=4000, keep=10) is None


def test_very_long_turns_are_folded_even_past_the_keep_count() -> None:
    fold = plan_fold(rows(6, size=4000), NEW, None, max_messages=20, max_tokens=1000, keep=10)
    assert fold is not None and fold.kept == [] and fold.through_id == 6


def test_a_reply_stored_after_the_new_messages_arrived_is_not_folded() -> None:
    # Rows 1..22 are history, but the question being answered is message 15 (a burst): the
    # watermark must stay below it, or it would never be read again.
    fold = plan_fold(rows(22), NEW, None, max_messages=20, max_tokens=4000, keep=2, new_ids=[15])
    assert fold is not None and fold.through_id < 15


def test_the_summary_is_a_second_system_message_before_the_kept_turns() -> None:
    prompt = build_prompt(
        "be kind", "style", [Turn(Sender.USER, "hi")], NEW, max_messages=20, max_tokens=4000
    )
    carried = with_summary(prompt, "The person is Ada.")
    assert carried[0] == prompt[0]
    assert carried[1] == {"role": "system", "content": SUMMARY_PREFIX + "The person is Ada."}
    assert carried[2:] == prompt[1:]
    assert with_summary(prompt, None) == prompt


def test_the_summary_call_has_its_own_instruction_and_carries_the_summary_so_far() -> None:
    request = summary_request("Ada ordered bread.", [Turn(Sender.USER, "and a cake")])
    assert request[0] == {"role": "system", "content": SUMMARY_SYSTEM_PROMPT}
    assert "Ada ordered bread." in request[1]["content"]
    assert "Person: and a cake" in request[1]["content"]


def simulate(turns: int, user_chars: int, reply_chars: int, **limits: int) -> tuple[int, int]:
    """Summary calls over `turns` exchanges with the defaults (20 messages, 4000 tokens, keep
    10), and the largest history (summary + kept + new) sent, in estimated tokens."""
    history: list[StoredTurn] = []
    summary: str | None = None
    next_id, calls, largest = 1, 0, 0
    max_messages = limits.get("max_messages", 20)
    max_tokens = limits.get("max_tokens", 4000)
    for _ in range(turns):
        new = [Turn(Sender.USER, "u" * user_chars)]
        fold = plan_fold(
            history, new, summary, max_messages=max_messages, max_tokens=max_tokens, keep=10
        )
        kept = [Turn(r.sender, r.body) for r in history]
        if fold is not None:
            calls += 1
            summary = "s" * 600  # a summary of a few sentences
            history = [r for r in history if r.id > fold.through_id]
            kept = fold.kept
        cost = summary_cost(summary) + sum(estimate_tokens(t.body) for t in [*kept, *new])
        largest = max(largest, cost)
        history += [
            StoredTurn(Sender.USER, "u" * user_chars, None, next_id),
            StoredTurn(Sender.ASSISTANT, "a" * reply_chars, next_id, next_id + 1),
        ]
        next_id += 2
    return calls, largest


def test_the_cost_of_summary_memory_in_calls_per_100_turns_with_the_defaults() -> None:
    # SMS-sized exchanges: the 20-message count binds first; a fold every 6 turns.
    calls, largest = simulate(100, user_chars=80, reply_chars=300)
    assert calls == 15 and largest <= 4000
    # Email-sized exchanges: the 4000-token budget binds first; the kept turns are held to
    # half the budget, so it is not every turn either.
    calls, largest = simulate(100, user_chars=800, reply_chars=1600)
    assert calls == 24 and largest <= 4000
