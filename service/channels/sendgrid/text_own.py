"""Quoted copies of Parley's own earlier replies, found by their words wherever they sit.

A person who answers below or between the lines of Parley's reply leaves no header to cut at;
but Parley knows what it wrote. A line is a copy of it when (nearly) all its word trigrams occur
in Parley's earlier replies, whatever the quote markers (`>`, `> >`, indentation) and however
the client re-wrapped the lines. Short lines ("Hi Anna,", one word left over by re-wrapping)
count only when they continue an own line word for word, so a person's inline "Yes" stays.
Linear: a set and a dict of trigrams over capped input.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_OWN_REPLIES = 20
MAX_OWN_CHARS = 50_000  # in total, over the replies
_MATCH_RATIO = 0.8

Trigram = tuple[str, str, str]


def words_of(text: str) -> list[str]:
    """Lower-case words, punctuation and quote markers dropped (split without regex)."""
    cleaned = "".join(c if c.isalnum() else " " for c in text.lower())
    return cleaned.split()


class OwnReplies:
    """Parley's earlier replies in the conversation, ready to recognise quoted copies."""

    def __init__(self, replies: Sequence[str]) -> None:
        words: list[str] = []
        budget = MAX_OWN_CHARS
        for reply in list(replies)[-MAX_OWN_REPLIES:]:
            words.extend(words_of(reply[:budget]))
            words.append("\x00")  # no trigram spans two replies
            budget -= min(budget, len(reply))
            if budget <= 0:
                break
        self._words = words
        self._first_at: dict[Trigram, int] = {}
        for at in range(len(words) - 2):
            self._first_at.setdefault((words[at], words[at + 1], words[at + 2]), at)

    def __bool__(self) -> bool:
        return bool(self._first_at)

    def mark(self, lines: Sequence[str]) -> list[bool]:
        """For each line, whether it is (part of) a quoted copy of an own reply."""
        if not self._first_at:
            return [False] * len(lines)
        line_words = [words_of(line) for line in lines]
        spans: list[tuple[int, int] | None] = [self._span(words) for words in line_words]
        self._extend_short_lines(line_words, spans)
        return [span is not None for span in spans]

    def _span(self, words: list[str]) -> tuple[int, int] | None:
        """Where in the own text a line of 3+ words sits, when nearly all of it is there."""
        if len(words) < 3:
            return None
        found = [
            self._first_at.get((words[k], words[k + 1], words[k + 2]))
            for k in range(len(words) - 2)
        ]
        hits = [at for at in found if at is not None]
        if len(hits) < _MATCH_RATIO * len(found):
            return None
        start = hits[0] - found.index(hits[0])
        return max(0, start), min(len(self._words), start + len(words))

    def _extend_short_lines(
        self, line_words: list[list[str]], spans: list[tuple[int, int] | None]
    ) -> None:
        """A short line is own when it continues the own line before it, or leads into the
        own line after it, word for word."""
        for index, words in enumerate(line_words):
            if spans[index] is not None or not words or len(words) > 2:
                continue
            before = _neighbour(line_words, spans, index, -1)
            if before is not None and self._words[before[1] : before[1] + len(words)] == words:
                spans[index] = (before[1], before[1] + len(words))
                continue
            after = _neighbour(line_words, spans, index, 1)
            if after is not None and self._words[max(0, after[0] - len(words)) : after[0]] == words:
                spans[index] = (after[0] - len(words), after[0])


def _neighbour(
    line_words: list[list[str]], spans: list[tuple[int, int] | None], index: int, step: int
) -> tuple[int, int] | None:
    """The span of the nearest line with words in direction `step`, if it is an own line."""
    j = index + step
    while 0 <= j < len(line_words) and not line_words[j]:
        j += step
    if 0 <= j < len(line_words):
        return spans[j]
    return None
