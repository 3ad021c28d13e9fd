"""Text rules: which lines of a plain-text mail the person wrote, and which are quoted history.

Everything here is linear in the input: lines are looked at with string methods (no regular
expression that could backtrack), a line longer than `MAX_LINE` chars is content and never a
header, and a header is looked for over at most three lines. The rules keep the person's words:

* `>` lines (and quoted copies of Parley's own replies, marked by `text_own`) are history
  wherever they sit, so text above, between and below them stays (top, inline, bottom posting);
* an attribution ("On … Bob wrote:", "Le … a écrit :", "2014-10-17 11:28 GMT+03:00 X <…>:") or
  an Outlook "From:/Sent:" block is dropped with the quote that follows it; when what follows is
  not marked as a quote, it is history to the end (Outlook and Android do not mark it). A weak
  attribution ("Bob wrote:", no date or address) counts only when a `>` quote follows it;
* a forwarded message is kept, marked "[forwarded message]": the person sent it to be read;
* the signature goes only from the end, and only when it looks like one (`text_signature`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from service.channels.sendgrid.text_markers import (
    FORWARDED,
    FROM_LABELS,
    HEADER_START_WORDS,
    ORIGINAL_MESSAGE,
    OTHER_LABELS,
    WROTE_CJK_ENDINGS,
    WROTE_WORDS,
)

MAX_LINE = 1000  # longer lines are content: no header is that long
MAX_HEADER_CHARS = 600  # an attribution wrapped over three lines is still short
FORWARD_MARK = "[forwarded message]"
QUOTE_PLACEHOLDER = "\ue000"  # a line standing for a quote removed from the HTML tree
_SEPARATOR_CHARS = frozenset("-_=*–—~ ")  # noqa: RUF001 - the dashes clients really use
_EMBEDDED_STARTS = (" on ", "-on ", " le ", " am ", " el ", " il ", " op ", " em ", " den ")


class Kind(enum.Enum):
    STRONG = "attribution with a date or an address"
    WEAK = "attribution that counts only above a quote"
    CUT = "original-message line or Outlook header block"
    FORWARD = "start of a forwarded message"


@dataclass(frozen=True)
class Header:
    kind: Kind
    start: int
    end: int  # first line after the header
    prefix: str = ""  # the person's words before a header on the same line
    block: bool = False  # an Outlook "From:/Sent:" block (a forward when the subject says so)


@dataclass(frozen=True)
class Split:
    """The person's own words, and the forwarded message they sent along (if any), without
    its marker line."""

    own_words: str
    forwarded: str = ""


def is_quoted(line: str) -> bool:
    stripped = line.strip()
    return stripped.startswith(">") or (bool(stripped) and not stripped.strip(QUOTE_PLACEHOLDER))


def split_new_text(
    lines: Sequence[str],
    own: Sequence[bool],
    *,
    cut_at_headers: bool = True,
    subject_is_forward: bool = False,
) -> Split:
    """Walk the lines once, top to bottom, keeping what the person wrote.

    `own[i]` marks a line as a quoted copy of Parley's earlier reply. With `cut_at_headers`
    false (HTML whose quotes were already removed from the tree) a header only goes when a
    quote follows it, and never ends the text.
    """
    kept: list[str] = []
    i, n = 0, len(lines)
    while i < n:
        if is_quoted(lines[i]) or own[i]:
            i = _quote_run_end(lines, own, i)
            kept.append("")
            continue
        header = header_at(lines, i)
        if header is None:
            kept.append(lines[i])
            i += 1
            continue
        follower = _next_nonblank(lines, header.end)
        forward = header.kind is Kind.FORWARD or (header.block and subject_is_forward)
        if forward:
            kept.append(header.prefix)
            _drop_trailing_separator(kept)
            rest = lines[header.start if header.block else header.end :]
            return Split("\n".join(kept), "\n".join(rest))
        if follower < n and (is_quoted(lines[follower]) or own[follower]):
            kept.append(header.prefix)
            i = follower
            continue
        if cut_at_headers and header.kind is not Kind.WEAK:
            kept.append(header.prefix)
            _drop_trailing_separator(kept)
            break
        kept.append(lines[i])
        i += 1
    return Split("\n".join(kept))


def _quote_run_end(lines: Sequence[str], own: Sequence[bool], start: int) -> int:
    """The line after a run of quoted lines (blank lines and wrapped quote lines included)."""
    last = start
    j = start + 1
    while j < len(lines):
        line = lines[j]
        if is_quoted(line) or own[j]:
            last = j
        elif line.strip():
            if j != last + 1 or not _continues_quote(lines, own, last, j):
                break
            last = j
        j += 1
    return last + 1


def _continues_quote(lines: Sequence[str], own: Sequence[bool], previous: int, j: int) -> bool:
    """An unmarked line between two quoted lines that is the wrapped tail of the first one
    (clients re-wrap long quoted lines without repeating `>`), not an inline answer."""
    if j + 1 >= len(lines) or not (is_quoted(lines[j + 1]) or own[j + 1]):
        return False
    before = lines[previous].strip()
    first = lines[j].lstrip()[:1]
    return len(before) >= 50 and before[-1] not in ".?!:" and not first.isupper()


def _next_nonblank(lines: Sequence[str], start: int) -> int:
    j = start
    while j < len(lines) and not lines[j].strip():
        j += 1
    return j


def _drop_trailing_separator(kept: list[str]) -> None:
    """The "____" or "-----" line Outlook draws above its header block belongs to the quote."""
    while kept and not kept[-1].strip():
        kept.pop()
    if kept and _is_separator(kept[-1]):
        kept.pop()


def _is_separator(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= 5 and len(stripped) <= MAX_LINE and set(stripped) <= _SEPARATOR_CHARS


def header_at(lines: Sequence[str], i: int) -> Header | None:
    """The quote header starting at line `i`, if there is one."""
    line = lines[i]
    if len(line) > MAX_LINE or not line.strip():
        return None
    low = line.strip().lower()
    phrase = low.strip(" \t-–—_=*:>[]")  # noqa: RUF001
    if phrase in FORWARDED:
        return Header(Kind.FORWARD, i, i + 1)
    if phrase in ORIGINAL_MESSAGE and _is_separator_like(low):
        return Header(Kind.CUT, i, i + 1)
    block_end = _header_block_end(lines, i)
    if block_end:
        return Header(Kind.CUT, i, block_end, block=True)
    return _attribution(lines, i)


def _is_separator_like(low: str) -> bool:
    """ "-----Original Message-----" or a line holding only the phrase (with a colon)."""
    return low[:1] in "-_=*" or low.endswith(("-", ":")) or len(low) <= 40


def _label(line: str) -> str:
    """The label of a header line ("From", "Envoyé", "送信日時"), lower-case, or ''."""
    stripped = line.strip().lstrip("*").lower()
    colon = _first_colon(stripped)
    if colon <= 0 or colon > 25:
        return ""
    return stripped[:colon].strip(" *\t")


def _first_colon(text: str) -> int:
    positions = [p for p in (text.find(":", 0, 30), text.find("：", 0, 30)) if p >= 0]  # noqa: RUF001
    return min(positions) if positions else -1


def _header_block_end(lines: Sequence[str], i: int) -> int:
    """End of an Outlook-style header block starting at `i` ("From: …", "Sent: …", …), or 0.

    Two labels at least, the first a From/Date/Sent one, and an address or a third label, so a
    person's "From: Monday / To: Friday" stays. A wrapped value may take one extra line.
    """
    first = _label(lines[i])
    if first not in FROM_LABELS:
        return 0
    labels = {first}
    has_address = "@" in lines[i]
    j, wrapped = i + 1, 0
    while j < len(lines) and j < i + 10 and lines[j].strip() and len(lines[j]) <= MAX_LINE:
        label = _label(lines[j])
        if label in labels:
            break  # a block names each field once: "From: a" 20,000 times is not one block
        if label in OTHER_LABELS or label in FROM_LABELS:
            labels.add(label)
            wrapped = 0
        elif wrapped:
            break
        else:
            wrapped = 1
        has_address = has_address or "@" in lines[j]
        j += 1
    if len(labels) >= 2 and (has_address or len(labels) >= 3):
        return j
    return 0


def _attribution(lines: Sequence[str], i: int) -> Header | None:
    """An "On … wrote:"-like header on line `i`, alone or wrapped over two or three lines."""
    first = lines[i].strip()
    single = _attribution_kind(first)
    if single is not None:
        prefix, header_part = _split_same_line(first)
        kind = _attribution_kind(header_part) if prefix else single
        return Header(kind or single, i, i + 1, prefix)
    if not _starts_like_header(first.lower()) or first[-1] in ".?!":
        return None
    parts = [first]
    for j in range(i + 1, min(i + 3, len(lines))):
        line = lines[j].strip()
        if not line or len(line) > MAX_LINE or is_quoted(line):
            return None
        if _starts_like_header(line.lower()) and _attribution_kind(line) is Kind.STRONG:
            return None  # the header starts on that line, not here
        parts.append(line)
        kind = _attribution_kind(" ".join(parts))
        if kind is not None:
            return Header(kind, i, j + 1)
    return None


def _attribution_kind(text: str) -> Kind | None:
    """STRONG for "On <date>, Bob <bob@x> wrote:", WEAK for "Bob wrote:", else None."""
    low = text.strip().lower()
    if not low or len(low) > MAX_HEADER_CHARS:
        return None
    has_address = "@" in low
    has_digit = any(c.isdigit() for c in low)
    dashed = low[0] == "-" and low[-1] == "-"
    ending = _wrote_ending(low)
    if ending is not None:
        has_colon = ending
        if dashed or (has_colon and (has_address or (has_digit and _starts_like_header(low)))):
            return Kind.STRONG  # "---- Bob wrote ----" is a client's line, never a person's
        return Kind.WEAK
    if low.endswith((">:", "):", ">：")) and has_address and has_digit:  # noqa: RUF001
        return Kind.STRONG  # "2014-10-17 11:28 GMT+03:00 X <x@y>:", "Op … schreef X <x@y>:"
    if low.endswith(">") and has_address and low[0].isdigit():
        return Kind.WEAK  # "2011/4/7 Nathan <support@example.com>" above a quote
    return None


def _wrote_ending(low: str) -> bool | None:
    """Whether the text ends with a "wrote"-like verb: True with a colon, False without one,
    None when it does not end so. One set lookup of the last word (a suffix check only for
    the CJK forms, written without a space)."""
    trimmed = low.rstrip(" \t-–—*")  # noqa: RUF001
    has_colon = trimmed.endswith((":", "："))  # noqa: RUF001
    trimmed = trimmed.rstrip(" \t:：")  # noqa: RUF001
    if not trimmed:
        return None
    if ord(trimmed[-1]) >= 0x3000:
        return has_colon if trimmed.endswith(WROTE_CJK_ENDINGS) else None
    last_word = trimmed[-30:].rsplit(None, 1)[-1]
    return has_colon if last_word in WROTE_WORDS else None


def _starts_like_header(low: str) -> bool:
    """Does the text begin as attributions do: a date, "On", "Le", "W dniu", a weekday?"""
    if low[:1].isdigit() or low[:1] in "-*":
        return True
    first = low[:16].split(None, 1)
    word = first[0].rstrip(".,") if first else ""
    return word in HEADER_START_WORDS or low.startswith("w dniu ")


def _split_same_line(line: str) -> tuple[str, str]:
    """ "reply On Wed, Apr 4, 2012 at 3:59 PM, bob@example.com wrote:" → ("reply", "On …")."""
    low = line.lower()
    if _starts_like_header(low):
        return "", line
    for start in _EMBEDDED_STARTS:
        at = low.find(start)
        if at > 0:
            header = line[at + 1 :]
            if _attribution_kind(header) is Kind.STRONG:
                return line[: at + 1].rstrip(" -"), header
    return "", line
