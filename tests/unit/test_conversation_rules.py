"""Parley's own conversation rules, as pure functions: keywords, history bounds, reply shapes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.channels.twilio.sms import SMS_MAX_CHARS, TwilioSms
from service.conversation import (
    bounded_history,
    build_prompt,
    classify_sms,
    estimate_tokens,
    keyword_of,
    split_at_words,
    summary_of,
)
from service.types import Intent, Sender, Turn


@pytest.mark.parametrize(
    ("body", "intent"),
    [
        ("STOP", Intent.OPT_OUT),
        ("  stop. ", Intent.OPT_OUT),
        ("Unsubscribe!", Intent.OPT_OUT),
        ("revoke", Intent.OPT_OUT),
        ("OptOut", Intent.OPT_OUT),
        ("start", Intent.OPT_IN),
        ("UNSTOP", Intent.OPT_IN),
        ("yes", Intent.OPT_IN),
        ("help?", Intent.HELP),
        ("info", Intent.HELP),
        ("please stop texting me", Intent.MESSAGE),
        ("STOP STOP", Intent.MESSAGE),
        ("", Intent.MESSAGE),
    ],
)
def test_a_keyword_is_the_whole_message_in_any_case(body: str, intent: Intent) -> None:
    assert classify_sms(body) is intent


@pytest.mark.parametrize(
    ("declared", "intent"),
    [("STOP", Intent.OPT_OUT), ("start", Intent.OPT_IN), ("HELP", Intent.HELP)],
)
def test_twilio_opt_out_type_wins_over_the_words(declared: str, intent: Intent) -> None:
    assert classify_sms("arrêtez", declared) is intent


def test_keyword_strips_edge_punctuation_only() -> None:
    assert keyword_of(" ¡Stop! ") == "STOP"
    assert keyword_of("st-op") == "ST-OP"


def test_split_keeps_words_whole_and_order() -> None:
    text = " ".join(f"word{i}" for i in range(800))
    parts = split_at_words(text, SMS_MAX_CHARS)
    assert all(len(p) <= 1600 for p in parts)
    assert " ".join(parts) == text
    assert len(parts) == 4  # 6,289 characters: no more parts than the words need


def test_split_cuts_a_word_longer_than_the_limit_hard() -> None:
    assert split_at_words("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]


def test_split_of_a_short_or_empty_text() -> None:
    assert split_at_words("  hi  ", SMS_MAX_CHARS) == ["hi"]
    assert split_at_words("   ", SMS_MAX_CHARS) == []


@given(st.text(max_size=5000), st.integers(min_value=1, max_value=200))
def test_split_never_exceeds_the_limit_nor_loses_words(text: str, limit: int) -> None:
    parts = split_at_words(text, limit)
    assert all(0 < len(p) <= limit for p in parts)
    assert "".join("".join(parts).split()) == "".join(text.split())


def _turns(*bodies: str) -> list[Turn]:
    return [Turn(Sender.USER if i % 2 == 0 else Sender.ASSISTANT, b) for i, b in enumerate(bodies)]


def test_history_keeps_the_newest_turns_within_the_count() -> None:
    history = _turns("a", "b", "c", "d")
    assert [t.body for t in bounded_history(history, _turns("new"), 2, 10_000)] == ["c", "d"]


def test_history_drops_the_oldest_turns_past_the_token_budget() -> None:
    history = _turns("x" * 400, "y" * 40, "z" * 40)
    new = _turns("q")
    budget = estimate_tokens("q") + 2 * estimate_tokens("y" * 40)
    assert [t.body for t in bounded_history(history, new, 20, budget)] == ["y" * 40, "z" * 40]


def test_history_stops_at_the_first_turn_that_does_not_fit() -> None:
    """No gaps: an older small turn is not kept once a newer one was dropped."""
    history = _turns("small", "x" * 4000, "newest")
    kept = bounded_history(history, _turns("q"), 20, 100)
    assert [t.body for t in kept] == ["newest"]


def test_no_history_when_the_count_is_zero() -> None:
    assert bounded_history(_turns("a", "b"), _turns("q"), 0, 10_000) == []


def test_prompt_carries_system_channel_style_history_then_new_turns() -> None:
    prompt = build_prompt(
        "Be brief.",
        TwilioSms.style,
        _turns("hello", "hi there"),
        [Turn(Sender.USER, "what now?")],
        max_messages=20,
        max_tokens=4000,
    )
    assert prompt[0]["role"] == "system"
    assert prompt[0]["content"].startswith("Be brief.") and "SMS" in prompt[0]["content"]
    assert [(m["role"], m["content"]) for m in prompt[1:]] == [
        ("user", "hello"),
        ("assistant", "hi there"),
        ("user", "what now?"),
    ]


def test_summary_is_the_first_fifty_characters_on_one_line() -> None:
    assert summary_of("Hello\n\nthere   friend " + "x" * 100) == ("Hello there friend " + "x" * 31)
