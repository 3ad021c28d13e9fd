"""Mail as MIME sees it, for both directions: what is automatic mail (loops), the threading
ids, and a reply's subject, threading headers and HTML body."""

from __future__ import annotations

import html
import re
import secrets
from collections.abc import Mapping
from email.message import EmailMessage

from service.channels.sendgrid.limits import (
    MAX_MESSAGE_ID_CHARS,
    MAX_REFERENCES,
    MAX_SUBJECT_CHARS,
    header_text,
    header_token,
)

AUTO_REPLY = "auto-replied"
_REPLY_PREFIX = re.compile(r"^\s*((re|fwd?|aw|sv|wg)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
_SYSTEM_SENDERS = ("mailer-daemon", "postmaster")
# Addresses that say no one reads replies (noreply@, no-reply@, do_not_reply@, ...) and
# bounce addresses (bounce@, bounces+tag@, bounce-123@): PEERS' loop answered them 64 times.
_NO_REPLY_PREFIXES = ("noreply", "donotreply")
_BOUNCE = re.compile(r"(?:^|[-+._])bounces?(?:[-+._]|$)")  # also Mailman's `list-bounces@`
_BULK_PRECEDENCE = {"bulk", "junk", "list"}


def is_automatic(message: EmailMessage, sender: str, local: str) -> bool:
    """Mail no one should answer: auto-replies, bounces, bulk and list mail, and our own.

    Answering them is how mail loops start (RFC 3834)."""
    auto_submitted = str(message.get("Auto-Submitted") or "no").strip().lower()
    precedence = str(message.get("Precedence") or "").strip().lower()
    return (
        not auto_submitted.startswith("no")
        or precedence in _BULK_PRECEDENCE
        or any(message.get(h) is not None for h in ("X-Autoreply", "X-Autorespond", "List-Id"))
        or message.get_content_type() == "multipart/report"
        or is_unanswerable_address(sender)
        or sender == local
    )


def is_unanswerable_address(address: str) -> bool:
    """A system, no-reply or bounce mailbox: a reply to it reaches no one, or a robot."""
    mailbox = address.rpartition("@")[0].lower() if "@" in address else address.lower()
    squashed = re.sub(r"[-_.]", "", mailbox.split("+")[0])
    return (
        mailbox in _SYSTEM_SENDERS
        or squashed.startswith(_NO_REPLY_PREFIXES)
        or _BOUNCE.search(mailbox) is not None
    )


def message_ids(value: object) -> list[str]:
    """Message ids in a threading header, each on one line and short enough to store."""
    return [i for i in header_text(str(value or "")).split() if len(i) <= MAX_MESSAGE_ID_CHARS]


def reply_subject(subject: str | None) -> str:
    """`Re: <subject>` once, whatever prefixes the subject already carries; on one line, even
    for a subject stored before inbound subjects were cleaned."""
    stripped = _REPLY_PREFIX.sub("", header_text(subject or "")[:MAX_SUBJECT_CHARS]).strip()
    return f"Re: {stripped}" if stripped else "Re: your message"


def reply_headers(inbound_headers: Mapping[str, str], local_address: str) -> dict[str, str]:
    """Threading headers for a reply, and our own Message-ID for the next turn. Ids are re-read
    from what was stored (one line each, short), so nothing unclean reaches a header."""
    domain = header_token(local_address.rpartition("@")[2]) or "parley.invalid"
    headers = {
        "Message-ID": f"<parley-{secrets.token_hex(12)}@{domain}>",
        "Auto-Submitted": AUTO_REPLY,
    }
    parent = header_token(inbound_headers.get("Message-ID", ""))
    if parent and len(parent) <= MAX_MESSAGE_ID_CHARS:
        references = message_ids(inbound_headers.get("References", ""))[-MAX_REFERENCES:]
        headers["In-Reply-To"] = parent
        if parent not in references:
            references.append(parent)
        headers["References"] = " ".join(references)
    return headers


def text_to_html(text: str) -> str:
    paragraphs = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    return "".join(f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>" for p in paragraphs)
