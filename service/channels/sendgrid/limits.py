"""The caps every inbound mail is cut to before a library sees it, and the linear helpers that
apply them. Nothing here imports a parsing library: the serve process uses these on the
header-level read, the extraction child (see `extraction`) before MIME parsing, HTML to text and
reply stripping.

Why caps at all, when the child runs under a deadline: the deadline bounds time, the caps make
the ordinary case (a big but honest mail) finish inside it, with its quotes stripped, instead of
falling back to unstripped text. Measured costs behind each number are in docs/SECURITY-email.md.
"""

from __future__ import annotations

import codecs
import html as html_lib
import re
from email.policy import EmailPolicy

from service import storable

# Text given to reply stripping and stored as the message body. The newest reply is at the top,
# so the tail of a longer text is quoted history or a rare very long mail (SPEC §9: truncated).
MAX_TEXT_CHARS = 32_000
# No line longer than this reaches the text rules (the regex-based stripper Parley used before
# backtracked quadratically within one line); longer lines are wrapped, at a space if any.
MAX_LINE_CHARS = 500
# HTML given to inscriptis (a 58 KB table takes 80 ms; Gmail itself clips mail at 102 KB).
MAX_HTML_CHARS = 256_000
# One header value as the stdlib header parser sees it (its parser is quadratic: 20,000
# encoded words in a Subject take 6.7 s, 20,000 `;` in a Content-Type 4.3 s).
MAX_HEADER_CHARS = 2_000
# Parameters (`;`) kept in a Content-Type or Content-Disposition. The stdlib parses a part's
# parameters again on every header lookup (~0.1 ms each): 200 parts of 19 RFC 2231 pieces in
# both headers, a 97 KB mail, took 1.3 s, and waves of them starved larger ordinary mail.
MAX_HEADER_PARAMS = 10
_PARAMETERIZED = {"content-type", "content-disposition"}
_KEEP_TAIL = {"references", "in-reply-to"}  # the newest ids are at the end
# The top-level header block read in the serve process (SendGrid's `headers` field or the head
# of a raw mail); cut at a line end.
MAX_HEADER_BLOCK_BYTES = 256 * 1024
# MIME structure handed to the stdlib parser: multipart containers (which bound nesting depth:
# the parser checks every line against each open boundary) and boundary delimiter lines (10,000
# parts take 2.9 s; 100 parts of 10 parameters ~0.35 s). The mail is cut where a cap is
# passed; what comes before is kept.
MAX_MIME_CONTAINERS = 20
MAX_MIME_PARTS = 100
# Bytes of a raw mail the stdlib parser reads: it works line by line in Python (a 20 MB mail
# with one attachment takes 0.65 s), and the text parts come first in any real mail, before
# the attachments. Attachments past the cut are not listed.
MAX_MIME_BYTES = 10 * 1024 * 1024
# What is stored and sent back out in headers.
MAX_SUBJECT_CHARS = 998  # RFC 5322's line length
MAX_MESSAGE_ID_CHARS = 255  # the provider id column; longer ids are digested, not threaded
MAX_REFERENCES = 20
# The multipart/form-data request itself: parts, and the headers of one part. SendGrid
# sends two headers a part (Content-Disposition, Content-Type); python-multipart walks the
# spaces before a header value byte by byte (~0.3 µs each), so the headers' count and line
# length bound what a post can cost there: 500 x 4 x 2 KiB, ~1 s at most (990 parts of seven
# 4,000-space headers took 7.5 s).
MAX_FORM_PARTS = 500
MAX_FORM_PART_HEADERS = 4
MAX_FORM_PART_HEADER_LINE_BYTES = 2048
# SendGrid's `dkim` field (one `@domain : result` per signature).
MAX_AUTH_FIELD_CHARS = 4_000

# Besides the control characters `storable` removes, the Unicode line and paragraph
# separators must not reach a header line either: they become spaces, then runs collapse.
_LINE_SEPARATORS = {0x2028: " ", 0x2029: " "}
_TAG = re.compile(r"<[^<>]*>")  # linear: a `<` scans only to the next `<` or `>`
_BLANK_RUNS = re.compile(r"\n{3,}")
# Text codecs written in Python with a cost beyond linear: 256 KB named `punycode` took 9.7 s
# (every other codec of the stdlib decodes 64 KB of any bytes in under 10 ms).
_SLOW_CODECS = frozenset({"punycode", "idna"})
_BOUNDARY_PARAM = re.compile(
    rb'boundary[ \t]*=[ \t]*(?:"([^"\r\n]{1,100})"|([^\s;"]{1,100}))', re.IGNORECASE
)
_DELIMITER_LINE = re.compile(rb"^--([^\r\n]{1,104})", re.MULTILINE)


def header_text(value: str) -> str:
    """Header text on one line: no control characters, whitespace runs as one space."""
    return " ".join(storable.text(value).translate(_LINE_SEPARATORS).split())


def header_token(value: str) -> str:
    """A token that has no spaces in it (a Message-ID, an address): all of them removed."""
    return "".join(header_text(value).split())


def decode_text(data: bytes, charset: str) -> str:
    """Bytes in their declared charset, undecodable ones replaced. An unknown charset, or one
    whose decoder is slow Python (`_SLOW_CODECS`), is read as UTF-8."""
    try:
        if codecs.lookup(charset).name not in _SLOW_CODECS:
            return data.decode(charset, "replace")
    except LookupError:  # an unknown charset name: better some text than none
        pass
    return data.decode("utf-8", "replace")


def cap_text(text: str) -> str:
    """At most `MAX_TEXT_CHARS`, no line over `MAX_LINE_CHARS` (wrapped at a space if there is
    one in reach, else cut). Linear: each character is looked at a bounded number of times."""
    lines = []
    for line in text[:MAX_TEXT_CHARS].replace("\r\n", "\n").split("\n"):
        lines.extend(_wrapped(line))
    return "\n".join(lines)


def _wrapped(line: str) -> list[str]:
    if len(line) <= MAX_LINE_CHARS:
        return [line]
    pieces = []
    start = 0
    while len(line) - start > MAX_LINE_CHARS:
        cut = line.rfind(" ", start + 1, start + MAX_LINE_CHARS)
        end = cut if cut > start else start + MAX_LINE_CHARS
        pieces.append(line[start:end])
        start = end + 1 if cut > start else end
    pieces.append(line[start:])
    return pieces


def cap_html(html: str) -> str:
    return html[:MAX_HTML_CHARS]


def crude_html_text(html: str) -> str:
    """HTML as text without a parser, for when inscriptis did not finish in time: tags out,
    entities decoded. Ugly (a style sheet's text may stay) but linear."""
    text = html_lib.unescape(_TAG.sub(" ", cap_html(html)))
    lines = (" ".join(line.split()) for line in text.replace("\r\n", "\n").split("\n"))
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


def fallback_body(plain: str | None, html: str | None) -> str:
    """The text a mail has without the libraries: truncated, quotes and signature kept."""
    if plain and plain.strip():
        return cap_text(plain).strip()
    return cap_text(crude_html_text(html or "")).strip()


def cap_header_value(name: str, value: str) -> str:
    """One header value cut to `MAX_HEADER_CHARS` (threading headers keep their end, where the
    newest ids are) and, for Content-Type and Content-Disposition, `MAX_HEADER_PARAMS`."""
    key = name.strip().lower()
    if len(value) > MAX_HEADER_CHARS:
        if key in _KEEP_TAIL:
            tail = value[-MAX_HEADER_CHARS:]
            value = tail[tail.find("<") :] if "<" in tail else tail
        else:
            value = value[:MAX_HEADER_CHARS]
    if key in _PARAMETERIZED:
        at = -1
        for _ in range(MAX_HEADER_PARAMS + 1):
            at = value.find(";", at + 1)
            if at < 0:
                break
        if at >= 0:
            value = value[:at]
    return value


class BoundedPolicy(EmailPolicy):
    """`email.policy.default`, except that every header value of every MIME part is capped as it
    is read from the source, before the header parser (which is where the quadratic costs are)
    ever sees it. `header_source_parse` is the documented hook for exactly this step."""

    def header_source_parse(self, sourcelines: list[str]) -> tuple[str, str]:
        name, value = super().header_source_parse(sourcelines)
        return name, cap_header_value(name, value)


BOUNDED = BoundedPolicy()


def cap_header_block(block: bytes) -> bytes:
    """The header block cut to `MAX_HEADER_BLOCK_BYTES`, at a line end."""
    if len(block) <= MAX_HEADER_BLOCK_BYTES:
        return block
    cut = block.rfind(b"\n", 0, MAX_HEADER_BLOCK_BYTES)
    return block[: cut + 1] if cut > 0 else block[:MAX_HEADER_BLOCK_BYTES]


def split_head(raw: bytes) -> tuple[bytes, bytes]:
    """A raw mail's header block (ending with its blank line) and its body."""
    match = re.search(rb"\r?\n\r?\n", raw)
    if match is None:
        return raw, b""
    return raw[: match.end()], raw[match.end() :]


def cap_mime(raw: bytes) -> bytes:
    """The raw mail cut at a line end within `MAX_MIME_BYTES`, and before its
    `MAX_MIME_CONTAINERS + 1`-th multipart boundary declaration or its `MAX_MIME_PARTS + 1`-th
    boundary delimiter line, whichever comes first. Linear scans; the stdlib parser then
    handles the cut mail as one whose end went missing."""
    boundaries: set[bytes] = set()
    cut = len(raw) if len(raw) <= MAX_MIME_BYTES else raw.rfind(b"\n", 0, MAX_MIME_BYTES) + 1
    for match in _BOUNDARY_PARAM.finditer(raw, 0, cut):
        boundary = match.group(1) or match.group(2)
        if boundary in boundaries:
            continue
        if len(boundaries) == MAX_MIME_CONTAINERS:
            cut = raw.rfind(b"\n", 0, match.start()) + 1
            break
        boundaries.add(boundary)
    delimiters = 0
    for match in _DELIMITER_LINE.finditer(raw, 0, cut):
        token = match.group(1).rstrip()
        if token.endswith(b"--") and token not in boundaries:
            token = token[:-2]
        if token in boundaries:
            delimiters += 1
            if delimiters > MAX_MIME_PARTS:
                cut = match.start()
                break
    return raw[:cut]
