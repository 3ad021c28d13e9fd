"""Signatures: removed only from the end of the person's text, and only when they look like one.

A line "Thanks, that fixed the login." or a dash list ("- yes please") is the person's words, and
so is a last "Thanks!" with nothing after it; a closing line ("Best regards,") followed by a few
short name-like lines (or "Regards, Roman"), a lone "-Bob", the
"-- " delimiter and a mobile footer ("Sent from my iPhone") at the very end are the signature.
Everything is string operations on the last few lines: linear, and never a regular expression.
"""

from __future__ import annotations

from service.channels.sendgrid.text_markers import CLOSINGS, MOBILE_FOOTER_ENDINGS, MOBILE_FOOTERS

_TAIL_LINES = 6  # a closing further up than this is the person's text
_DELIMITED_LINES = 15  # more than this after "-- " is not a signature
_SIGNATURE_LINE_CHARS = 60
_CLOSING_PUNCTUATION = " \t,.!;:-–—"  # noqa: RUF001


def strip_signature(text: str) -> str:
    """The text without the signature at its end (the text itself when nothing else is left)."""
    lines = _cut_at_delimiter(text.rstrip().split("\n"))
    while True:
        while lines and not lines[-1].strip():
            lines.pop()
        cut = _signature_start(lines)
        if cut is None or cut == 0:
            break
        lines = lines[:cut]
    return "\n".join(lines).rstrip() or text.strip()


def _cut_at_delimiter(lines: list[str]) -> list[str]:
    """Everything from the first "-- " line with only a short block after it."""
    for index in range(max(0, len(lines) - _DELIMITED_LINES - 1), len(lines)):
        if lines[index].rstrip() == "--" and index > 0:
            return lines[:index]
    return lines


def _signature_start(lines: list[str]) -> int | None:
    """Where the trailing signature starts (a footer, a dash name, a closing block), or None."""
    if not lines:
        return None
    last = len(lines) - 1
    if is_mobile_footer(lines[last]) or _is_rule(lines[last]):
        return last
    if _is_dash_name(lines[last]) and _stands_alone(lines, last) and not _in_list(lines, last):
        return last
    for index in range(max(0, len(lines) - _TAIL_LINES), len(lines)):
        if is_closing(lines[index]) and _stands_alone(lines, index):
            after = lines[index + 1 :]
            signed = bool(after) or "," in lines[index].strip().rstrip(",")
            if signed and all(_looks_like_signature_line(line) for line in after):
                return index
    return None


def is_mobile_footer(line: str) -> bool:
    low = line.strip().lower()
    if not low or len(low) > 80 or low.endswith("?") or len(low.split()) > 10:
        return False  # a sentence about the phone, not the phone's footer
    return low.startswith(MOBILE_FOOTERS) or low.endswith(MOBILE_FOOTER_ENDINGS)


def _is_rule(line: str) -> bool:
    stripped = line.strip()
    return 3 <= len(stripped) <= 100 and set(stripped) <= set("-_=*–—~")  # noqa: RUF001


def is_closing(line: str) -> bool:
    """ "Best regards," or "Regards, Roman"; not "Thanks, that fixed the login."."""
    low = line.strip().lower()
    if not low or len(low) > _SIGNATURE_LINE_CHARS:
        return False
    if low.rstrip(_CLOSING_PUNCTUATION) in CLOSINGS:
        return True
    head, comma, tail = line.strip().partition(",")
    return bool(comma) and head.strip().lower() in CLOSINGS and _is_name(tail)


def _stands_alone(lines: list[str], index: int) -> bool:
    """A sign-off starts a line of its own: after a blank line or a finished sentence."""
    if index == 0:
        return True
    before = lines[index - 1].rstrip()
    return not before or before[-1] in ".!?:)" or is_closing(before)


def _in_list(lines: list[str], index: int) -> bool:
    return index > 0 and lines[index - 1].lstrip().startswith(("-", "*", "•"))


def _looks_like_signature_line(line: str) -> bool:
    stripped = line.strip()
    return len(stripped) <= _SIGNATURE_LINE_CHARS and not stripped.endswith("?")


def _is_dash_name(line: str) -> bool:
    """ "-Abhishek Kona", "-- Bob": a dash and a name, not "- yes please"."""
    stripped = line.strip()
    if not stripped.startswith("-") or stripped.startswith("---"):
        return False
    return _is_name(stripped.lstrip("-"))


def _is_name(text: str) -> bool:
    words = text.strip().rstrip(".").split()
    if not 1 <= len(words) <= 4 or len(text) > 40:
        return False
    return all(word[0].isupper() and not any(c.isdigit() for c in word) for word in words)
