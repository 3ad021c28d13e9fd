"""From an email to the text the model should read: what the person wrote, all of it, and
nothing quoted.

Structure before heuristics. HTML mail marks its quotes, so they are removed from the HTML tree
(`text_html`) before the tree becomes text (inscriptis renders it: layout-aware, entities
decoded, no CSS or scripts). Plain-text mail, or HTML that marks nothing, goes through the text
rules (`text_quotes`, `text_signature`). Quoted copies of Parley's own earlier replies are
recognised by their words (`text_own`) wherever they sit, so bottom-posted and inline answers
keep every line the person wrote. A forwarded message is kept, marked "[forwarded message]".

Bounded (SPEC §9): the text is capped at `MAX_TEXT_CHARS`, the HTML before parsing, every rule
is linear in its input, and no regular expression here can backtrack.
"""

from __future__ import annotations

from collections.abc import Sequence

from lxml.html import HtmlElement

from service.channels.sendgrid import text_html
from service.channels.sendgrid.text_own import OwnReplies
from service.channels.sendgrid.text_quotes import FORWARD_MARK, QUOTE_PLACEHOLDER, split_new_text
from service.channels.sendgrid.text_signature import strip_signature

MAX_TEXT_CHARS = 100_000
_FORWARD_SUBJECTS = ("fw:", "fwd:", "wg:", "tr:", "rv:", "i:", "vs:", "vb:", "doorst:", "enc:")


def new_text(
    plain: str | None,
    html: str | None,
    own_replies: Sequence[str] = (),
    *,
    subject: str = "",
) -> str:
    """The text the model should read of a mail with these plain and HTML bodies.

    `own_replies` are Parley's earlier replies in the conversation; `subject` only tells an
    Outlook forward (its header block looks like a reply's) from a reply.
    """
    own = OwnReplies(own_replies)
    forward = subject.strip().lower().startswith(_FORWARD_SUBJECTS)
    has_plain = bool(plain and plain.strip())
    if html and html.strip():
        text = _from_html(html, own, forward=forward, has_plain=has_plain)
        if text is not None:
            return text
    return _read(plain or "", own, structured=False, forward=forward)


def _from_html(html: str, own: OwnReplies, *, forward: bool, has_plain: bool) -> str | None:
    """The text when the HTML decides (it marks its quotes, or it is all there is); None when
    the plain part should be read instead (it is the sender's own rendering of the text)."""
    tree = text_html.parse(html)
    if tree is not None and text_html.remove_quotes(tree):
        text = _read(_render(tree), own, structured=True, forward=forward)
        if text or has_plain:
            return text or None
        tree = text_html.parse(html)  # all of it was quote: read it rather than nothing
    if has_plain:
        return None
    return _read(_render(tree), own, structured=False, forward=forward) if tree is not None else ""


def html_to_text(html: str) -> str:
    """HTML as readable text, nothing removed (quotes included)."""
    tree = text_html.parse(html)
    return _tidy(_render(tree)) if tree is not None else ""


def latest_reply(text: str) -> str:
    """The newest part of a plain-text message: no quoted history, no signature."""
    return new_text(text, None)


def _read(text: str, own: OwnReplies, *, structured: bool, forward: bool) -> str:
    lines = _normalise(text).split("\n")
    split = split_new_text(
        lines, own.mark(lines), cut_at_headers=not structured, subject_is_forward=forward
    )
    words = _tidy(strip_signature(_tidy(split.own_words))) if split.own_words.strip() else ""
    forwarded = _tidy(split.forwarded)
    if forwarded or split.forwarded:
        forwarded = FORWARD_MARK + "\n" + forwarded
    result = "\n\n".join(part for part in (words, forwarded) if part)
    return result or _tidy(text)


def _normalise(text: str) -> str:
    text = text[:MAX_TEXT_CHARS]
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")


def _tidy(text: str) -> str:
    """Trailing spaces off, placeholders out, no more than one blank line in a row, and the
    indentation every line shares (the renderer's) removed."""
    text = _normalise(text).replace(QUOTE_PLACEHOLDER, "").replace("\xa0", " ")
    lines = [line.rstrip() for line in text.split("\n")]
    indent = min((len(line) - len(line.lstrip()) for line in lines if line), default=0)
    tidy: list[str] = []
    for line in lines:
        if line or (tidy and tidy[-1]):
            tidy.append(line[indent:])
    return "\n".join(tidy).strip("\n")


def _render(tree: HtmlElement) -> str:
    # Imported on first use: most mail has a text part.
    from inscriptis import Inscriptis
    from inscriptis.model.config import ParserConfig

    if text_html.element_count(tree) > text_html.MAX_RENDERED_ELEMENTS:
        return text_html.plain_render(tree)[:MAX_TEXT_CHARS]
    text_html.quiet_links(tree)
    text: str = Inscriptis(tree, ParserConfig(display_links=True)).get_text()
    return text[:MAX_TEXT_CHARS]
