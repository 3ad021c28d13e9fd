"""HTML mail: the quoted history is found in the tree, where the client marked it, before the
text exists. Gmail (`div.gmail_quote`), Apple Mail and Thunderbird (`blockquote type=cite`,
`.moz-cite-prefix`), Outlook (`#appendonsend`, `#divRplyFwdMsg`, the border-top header block and
everything after them), Yahoo (`.yahoo_quoted`), ProtonMail, Zoho and any other `blockquote` are
removed; a quote that starts a forwarded message is kept, and so is all that follows it. Each
removed quote leaves a placeholder line, so the text rules can drop the attribution line that
sat above it.

lxml (libxml2) is the parser inscriptis already uses, so the tree is parsed once and rendered
from the edited tree; libxml2 caps nesting at 255 levels, which bounds the renderer's
recursion, and the input is capped before parsing. Every walk here is iterative.
"""

from __future__ import annotations

from lxml.etree import ParserError
from lxml.html import HtmlElement, document_fromstring

from service.channels.sendgrid.text_markers import FORWARDED, FROM_LABELS
from service.channels.sendgrid.text_quotes import QUOTE_PLACEHOLDER

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
_SIGNATURE_CLASSES = frozenset({"gmail_signature", "gmail_signature_prefix", "moz-signature"})
_FORWARD_CLASSES = frozenset({"moz-forward-container"})


def parse(html: str) -> HtmlElement | None:
    html = html[:MAX_HTML_CHARS].replace(QUOTE_PLACEHOLDER, "").strip()
    if html.startswith("<?xml"):
        html = html[html.find(">") + 1 :]
    if not html:
        return None
    try:
        return document_fromstring(html)
    except (ParserError, ValueError):  # nothing but a comment or a doctype: no text
        return None


_CANDIDATES = "//blockquote | //*[@class] | //*[@id] | //div[@style] | //*[@data-smartmail]"


def remove_quotes(tree: HtmlElement) -> bool:
    """Remove the marked quotes and signatures; True when the mail marked any quote.

    The candidates come from one XPath query (in document order, in C); a candidate inside a
    quote already removed is skipped, a forwarded message ends the work (it and all after it
    are kept), and so does an Outlook cut (everything after it in the document is gone).
    """
    found = False
    for element in tree.xpath(_CANDIDATES):
        role = _role(element)
        if not role or not _in_tree(element, tree):
            continue
        if role == "forward" or (role in ("quote", "cut") and _is_forward(element)):
            return found
        if role == "signature":
            _replace_with_placeholder(element, "")
        elif role == "quote":
            _replace_with_placeholder(element, QUOTE_PLACEHOLDER)
            found = True
        else:
            _cut_from(element)
            return True
    return found


def _in_tree(element: HtmlElement, root: HtmlElement) -> bool:
    """Not inside a quote removed before (its subtree was cleared away)."""
    node = element
    while True:
        parent = node.getparent()
        if parent is None:
            return node is root
        node = parent


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


def _replace_with_placeholder(element: HtmlElement, text: str) -> None:
    """Turn the quote into a placeholder in place: O(1), where removing it from a parent with
    60,000 children would cost a search each time. The text after it (a bottom-posted answer)
    stays."""
    tail = element.tail
    element.clear()  # children, text, attributes and tail
    element.tag = "div"
    element.text = text
    element.tail = tail


def _cut_from(element: HtmlElement) -> None:
    """Remove the element and everything after it in the document (Outlook puts the whole
    quoted history after its header block, as siblings of the blocks that hold it)."""
    node: HtmlElement = element
    while node.tag != "body":
        parent = node.getparent()
        if parent is None:
            break
        del parent[parent.index(node) + 1 :]
        node.tail = None
        node = parent
    _replace_with_placeholder(element, QUOTE_PLACEHOLDER)
    element.tail = None


def quiet_links(tree: HtmlElement) -> None:
    """Show a link's target only where it adds something: not for mailto: links, nor where the
    text already is the address."""
    for link in tree.iter("a"):
        href = (link.get("href") or "").strip()
        text = (link.text_content() if len(link) else link.text or "").strip()
        bare = href.split(":", 1)[-1].lstrip("/")
        if href.lower().startswith(("mailto:", "tel:", "cid:")) or text in (href, bare):
            link.attrib.pop("href", None)


MAX_RENDERED_ELEMENTS = 10_000  # inscriptis grows a line by string concatenation: past this,
# a hostile page of inline elements would cost seconds, so the linear renderer below takes over
_BLOCK_TAGS = frozenset(
    {
        "address",
        "article",
        "aside",
        "blockquote",
        "br",
        "center",
        "dd",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "li",
        "main",
        "nav",
        "ol",
        "p",
        "pre",
        "section",
        "table",
        "tbody",
        "td",
        "th",
        "thead",
        "tr",
        "ul",
    }
)
_SKIPPED_TAGS = frozenset({"head", "script", "style", "title", "template"})


def element_count(tree: HtmlElement) -> int:
    return int(tree.xpath("count(//*)"))


def plain_render(tree: HtmlElement) -> str:
    """Text of the tree with work done in C: a line break after every block element, scripts
    and styles emptied, whitespace collapsed per line. Plainer than inscriptis, never slow."""
    for element in tree.iter(*_SKIPPED_TAGS):
        _replace_with_placeholder(element, "")
    for element in tree.iter(*_BLOCK_TAGS):
        element.tail = "\n" + (element.tail or "")
    text: str = tree.text_content()
    return "\n".join(" ".join(line.split()) for line in text.split("\n"))
