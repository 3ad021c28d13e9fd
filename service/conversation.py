"""Parley's own conversation rules, free of providers, HTTP and SQL.

What a message asks for (opt-out keywords), what the model is shown (history bounded by count
and by tokens), and how a reply is cut to a channel's limit (the limit and the channel's style
line are the channel plugin's). Pure functions over `service.types`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.media import IMAGE_TOKENS, history_text
from service.types import Intent, MediaItem, Sender, Turn

# One chat message for the model: `content` is text, or a list of content parts (a text part
# and `image_url` parts) for a turn that carries images.
PromptMessage = dict[str, Any]

OPT_OUT_WORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
)
OPT_IN_WORDS = frozenset({"START", "YES", "UNSTOP"})
HELP_WORDS = frozenset({"HELP", "INFO"})

HELP_TEXT = (
    "Parley: an AI assistant answers your texts. Reply STOP to stop all messages, "
    "START to resume. Msg&data rates may apply."
)

DEFAULT_SYSTEM_PROMPT = (
    "You are Parley, a helpful assistant that people reach by text message or email. "
    "Answer the person's latest message using the conversation so far. Be accurate and kind; "
    "say so when you do not know."
)

_EDGE_PUNCTUATION = re.compile(r"^[\W_]+|[\W_]+$")


def keyword_of(body: str) -> str:
    """The whole message as a keyword: any case, surrounding whitespace and punctuation ignored."""
    return _EDGE_PUNCTUATION.sub("", body.strip()).upper()


def classify_sms(body: str, opt_out_type: str | None = None) -> Intent:
    """Twilio's `OptOutType` wins (Advanced Opt-Out may use custom words); else our keywords."""
    declared = (opt_out_type or "").strip().upper()
    if declared == "STOP":
        return Intent.OPT_OUT
    if declared == "START":
        return Intent.OPT_IN
    if declared == "HELP":
        return Intent.HELP
    word = keyword_of(body)
    if word in OPT_OUT_WORDS:
        return Intent.OPT_OUT
    if word in OPT_IN_WORDS:
        return Intent.OPT_IN
    if word in HELP_WORDS:
        return Intent.HELP
    return Intent.MESSAGE


def estimate_tokens(text: str) -> int:
    """About four characters a token for English (OpenAI's rule of thumb), plus per-turn overhead.

    An estimate is enough for a budget that only decides which old turns to drop; an exact
    tokenizer would need model files fetched at run time."""
    return 4 + (len(text) + 3) // 4


def turn_tokens(turn: Turn) -> int:
    """A turn's estimated cost: its text, plus `media.IMAGE_TOKENS` per image."""
    return estimate_tokens(turn.body) + IMAGE_TOKENS * len(turn.images)


def bounded_history(
    history: Sequence[Turn], new: Sequence[Turn], max_messages: int, max_tokens: int
) -> list[Turn]:
    """The newest earlier turns that fit both limits, oldest first; `new` always goes."""
    budget = max_tokens - sum(turn_tokens(t) for t in new)
    kept: list[Turn] = []
    for turn in reversed(history[-max_messages:] if max_messages else []):
        cost = estimate_tokens(turn.body)
        if cost > budget:
            break
        budget -= cost
        kept.append(turn)
    kept.reverse()
    return kept


@dataclass(frozen=True)
class StoredTurn:
    """One stored message as history reads it: a reply split into parts is several rows."""

    sender: Sender
    body: str
    reply_to_id: int | None
    id: int = 0  # the stored row's (a summary's watermark is the last row it covers)
    media: tuple[MediaItem, ...] = ()


def history_rows_for(max_messages: int) -> int:
    """How many stored rows to read for `max_messages` turns: a reply may be several parts."""
    return max_messages * 4


def group_parts(rows: Sequence[StoredTurn]) -> list[list[StoredTurn]]:
    """The stored rows of each turn: consecutive parts of one split reply are one turn."""
    groups: list[list[StoredTurn]] = []
    for row in rows:
        previous = groups[-1][-1] if groups else None
        if (
            previous is not None
            and row.sender is Sender.ASSISTANT
            and previous.sender is row.sender
            and row.reply_to_id == previous.reply_to_id
        ):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def join_parts(rows: Sequence[StoredTurn]) -> list[Turn]:
    """Consecutive parts of one split reply become one turn again."""
    return [turn_of(group) for group in group_parts(rows)]


def turn_of(group: Sequence[StoredTurn]) -> Turn:
    return Turn(group[0].sender, " ".join(history_text(row.body, row.media) for row in group))


def build_prompt(
    system_prompt: str | None,
    style: str,
    history: Sequence[Turn],
    new: Sequence[Turn],
    *,
    max_messages: int,
    max_tokens: int,
) -> list[PromptMessage]:
    """Chat messages for the model: system prompt + the channel's `style` line, history, then
    the new turns."""
    system = f"{system_prompt or DEFAULT_SYSTEM_PROMPT}\n\n{style}"
    turns = [*bounded_history(history, new, max_messages, max_tokens), *new]
    return [{"role": "system", "content": system}] + [
        {"role": "user" if t.sender is Sender.USER else "assistant", "content": content_of(t)}
        for t in turns
    ]


def content_of(turn: Turn) -> str | list[dict[str, Any]]:
    """A turn's `content`: its text, or with images OpenAI's content parts, the text part
    first (left out when the message was only pictures), then one `image_url` part per image
    in the order they were sent."""
    if not turn.images:
        return turn.body
    text = [{"type": "text", "text": turn.body}] if turn.body else []
    return text + [{"type": "image_url", "image_url": {"url": url}} for url in turn.images]


def split_at_words(text: str, limit: int) -> list[str]:
    """Cut a reply into parts of at most `limit` characters at word boundaries, in order.

    A single word longer than the limit (a URL, say) is cut hard: better than refusing it."""
    text = text.strip()
    parts: list[str] = []
    while len(text) > limit:
        cut = text.rfind(" ", 0, limit + 1)
        if cut <= 0:
            cut = limit
        parts.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    if text:
        parts.append(text)
    return parts


def shape_reply(max_chars: int | None, text: str) -> list[str]:
    """The parts a reply goes out as on a channel with parts of at most `max_chars` (None:
    one part). The channel plugins' `split` (`ChannelPlugin.max_chars` says the limit)."""
    if max_chars is None:
        return [text.strip()]
    return split_at_words(text, max_chars)


def summary_of(body: str) -> str:
    """A conversation's summary: the first 50 characters of its first message."""
    return " ".join(body.split())[:50]
