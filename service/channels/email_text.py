"""From an email body to the text the model should see, through maintained libraries:
inscriptis renders HTML as readable text (layout-aware, entities decoded, no CSS or scripts),
mail-parser-reply cuts the quoted history, client headers ("On … wrote:", Outlook's
From/Sent block) and signatures ("-- ", "Sent from my iPhone") in several languages."""

from __future__ import annotations

import re

from mailparser_reply import EmailReplyParser

REPLY_LANGUAGES = ["en", "fr", "de", "es", "it", "nl", "pt", "sv"]
_parser = EmailReplyParser(languages=REPLY_LANGUAGES)
MAX_TEXT_CHARS = 100_000
_BLANK_RUNS = re.compile(r"\n{3,}")


def html_to_text(html: str) -> str:
    # Imported on first use: inscriptis brings lxml, and most mail has a text part.
    from inscriptis import get_text
    from inscriptis.model.config import ParserConfig

    text = get_text(
        html[: MAX_TEXT_CHARS * 10], ParserConfig(display_links=True)
    )  # link targets matter to questions
    return _BLANK_RUNS.sub("\n\n", text).strip()


def latest_reply(text: str) -> str:
    """The newest part of a message: no quoted history, no signature."""
    # The newest reply is at the top; a bound keeps a huge quoted history from costing seconds.
    text = text[:MAX_TEXT_CHARS].replace("\r\n", "\n").replace("\ufeff", "")
    replies = _parser.read(text=text).replies
    latest = replies[0].body.strip() if replies else ""
    return latest or text.strip()
