"""HTML mail: the quoted history is found in the tree, where the client marked it, before the
text exists. Gmail (`div.gmail_quote`), Apple Mail and Thunderbird (`blockquote type=cite`,
`.moz-cite-prefix`), Outlook (`#appendonsend`, `#divRplyFwdMsg`, the border-top header block and
everything after them), Yahoo (`.yahoo_quoted`), ProtonMail, Zoho and any other `blockquote` are
removed; a quote that starts a forwarded message is kept, and so is all that follows it. Each
removed quote leaves a
placeholder line, so the text rules can drop the attribution line that sat above it.

lxml (libxml2) is the parser inscriptis already uses, so the tree is parsed once and rendered
from the edited tree; libxml2 caps nesting at 255 levels, which bounds the renderer's
recursion, and the input is capped before parsing. Every walk here is iterative.
"""

from __future__ import annotations

from lxml.etree import ParserError
from lxml.html import HtmlElement, document_fromstring

from service.channels.email_markers import FORWARDED, FROM_LABELS
from service.channels.email_quotes import QUOTE_PLACEHOLDER

MAX_HTML_CHARS = 1_000_000
_PEEK_CHARS = 300  # enough of a quote's first text to see "Forwarded message"

_QUOTE_CLASSES = frozenset(
    {"gmail_quote", "yahoo_quoted", "protonmail_quote", "zmail_extra", "moz-cite-prefix"}
)
_CUT_IDS = frozenset(
    {
        "appendonsend",
        "divRplyFwdMsg",
        "OLK_SRC_BODY_SECTION",
        "mail-editor-reference-message-container",
    }
)
_SIGNATURE_CLASSES = frozenset({"gmail_signature", "moz-signature"})
_FORWARD_CLASSES = frozenset({"moz-forward-container"})


def parse(html: str) -> HtmlElement | None:
    html = html[:MAX_HTML_CHARS].replace(QUOTE_PLACEHOLDER, "").strip()
    if html.startswith("<?xml"):
        html = html[html.find(">") + 1 :]
    if not html:
        return None
    try:
        return document_fromstring(html)
    except (ParserError, ValueError):
        return document_fromstring("<pre>" + html.replace("<", "&lt;") + "</pre>")


def remove_quotes(tree: HtmlElement) -> bool:
    """Remove the marked quotes and signatures; True when the mail marked any quote.

    One iterative walk: a removed quote's subtree is not visited, a forwarded message is kept
    whole, and an Outlook cut ends the walk (everything after it in the document is gone).
    """
    found = False
    stack: list[HtmlElement] = [tree]
    while stack:
        element = stack.pop()
        if not isinstance(element.tag, str):
            continue  # comments, processing instructions
        role = _role(element)
        if role in ("quote", "cut") and _is_forward(element):
            return found  # the rest of the document is the forwarded message: kept
        if role == "signature":
            element.drop_tree()
        elif role == "quote":
            _replace_with_placeholder(element)
            found = True
        elif role == "cut":
            _cut_from(element)
            return True
        elif role != "forward":
            stack.extend(reversed(list(element)))
    return found


def _role(element: HtmlElement) -> str:
    classes = set((element.get("class") or "").split())
    ident = element.get("id") or ""
    if classes & _SIGNATURE_CLASSES or element.get("data-smartmail") == "gmail_signature":
        return "signature"
    if ident == "Signature":
        return "signature"
    if classes & _FORWARD_CLASSES:
        return "forward"
    if ident in _CUT_IDS or "OutlookMessageHeader" in classes or _is_outlook_header(element):
        return "cut"
    if classes & _QUOTE_CLASSES or ident.startswith("yahoo_quoted") or element.tag == "blockquote":
        return "quote"
    return ""


def _is_outlook_header(element: HtmlElement) -> bool:
    """Outlook desktop's `<div style="border:none;border-top:solid #E1E1E1 1.0pt…">` around
    "From: … Sent: …"."""
    if element.tag != "div" or "border-top" not in (element.get("style") or ""):
        return False
    start = _first_text(element).lstrip("* \t\r\n\xa0").lower()
    colon = start.find(":", 0, 30)
    return colon > 0 and start[:colon].strip(" *\xa0") in FROM_LABELS


def _text_pieces(element: HtmlElement) -> list[str]:
    """The first few hundred characters of an element's text, piece by piece (lazily: a big
    quote costs no more than a small one)."""
    pieces: list[str] = []
    size = 0
    for piece in element.itertext():
        pieces.append(piece)
        size += len(piece)
        if size >= _PEEK_CHARS:
            break
    return pieces


def _first_text(element: HtmlElement) -> str:
    return "".join(_text_pieces(element))[:_PEEK_CHARS]


def _is_forward(element: HtmlElement) -> bool:
    """Does the element's first line of text say "Forwarded message" (in any language)?"""
    for piece in _text_pieces(element):
        for line in piece.splitlines():
            phrase = line.strip(" \t\xa0-–—_=*:>").lower()  # noqa: RUF001
            if phrase:
                return phrase in FORWARDED
    return False


def _placeholder() -> HtmlElement:
    marker = HtmlElement("div")
    marker.text = QUOTE_PLACEHOLDER
    return marker


def _replace_with_placeholder(element: HtmlElement) -> None:
    element.addprevious(_placeholder())
    element.drop_tree()  # keeps the text after it (a bottom-posted answer)


def _cut_from(element: HtmlElement) -> None:
    """Remove the element and everything after it in the document (Outlook puts the whole
    quoted history after its header block, as siblings of the blocks that hold it)."""
    element.addprevious(_placeholder())
    node: HtmlElement | None = element
    while node is not None and node.tag != "body":
        parent = node.getparent()
        if parent is None:
            break
        for sibling in list(node.itersiblings()):
            parent.remove(sibling)
        node.tail = None
        node = parent
    element.getparent().remove(element)


def quiet_links(tree: HtmlElement) -> None:
    """Show a link's target only where it adds something: not for mailto: links, nor where the
    text already is the address."""
    for link in tree.iter("a"):
        href = (link.get("href") or "").strip()
        text = (link.text_content() if len(link) else link.text or "").strip()
        bare = href.split(":", 1)[-1].lstrip("/")
        if href.lower().startswith(("mailto:", "tel:", "cid:")) or text in (href, bare):
            link.attrib.pop("href", None)
