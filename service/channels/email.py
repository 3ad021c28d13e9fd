"""SendGrid email: Inbound Parse (parsed and raw mode), charsets, loop detection, threading,
and sending through the sendgrid SDK off the event loop.

Everything SendGrid- and MIME-specific lives here and in `email_text`; the rest of Parley sees
`Inbound`, `Outbound`, `SendResult` and `SendError`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email
import email.policy
import hashlib
import html
import json
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses, parseaddr
from typing import TYPE_CHECKING, Any

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from service.channels.base import LookupUnsupported
from service.channels.email_text import latest_reply, new_text

if TYPE_CHECKING:
    from service.channels.sendgrid_rest import SendGridRest

from service.types import Channel, Inbound, Intent, Outbound, SendResult

log = logging.getLogger(__name__)

AUTO_REPLY = "auto-replied"
_REPLY_PREFIX = re.compile(r"^\s*((re|fwd?|aw|sv|wg)\s*(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
_SYSTEM_SENDERS = ("mailer-daemon", "postmaster")
_BULK_PRECEDENCE = {"bulk", "junk", "list"}


class InvalidInbound(ValueError):
    """A request that is not a usable Inbound Parse post."""


# ---------------------------------------------------------------- authentication


def credentials_match(authorization: str | None, user: str, password: str) -> bool:
    """HTTP Basic against the configured pair, compared in constant time."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    expected = f"{user}:{password}".encode()
    return secrets.compare_digest(given, expected)


# ---------------------------------------------------------------- the multipart body


@dataclass(frozen=True)
class Part:
    data: bytes
    filename: str | None = None
    content_type: str | None = None


def parse_multipart(body: bytes, content_type: str) -> dict[str, list[Part]]:
    """Fields as raw bytes: SendGrid sends each text field in its own charset (see `charsets`),
    so decoding must wait until that field is read."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidInbound("expected multipart/form-data with a boundary")
    fields: dict[str, list[Part]] = {}
    current: dict[str, Any] = {}

    def on_part_begin() -> None:
        current.clear()
        current.update(headers={}, chunks=[], name=b"", value=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        current["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        current["value"] += data[start:end]

    def on_header_end() -> None:
        current["headers"][current["name"].lower()] = current["value"]
        current["name"], current["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current["chunks"].append(data[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(current["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name")
        if name is None:
            raise InvalidInbound("a multipart part has no field name")
        filename = disposition.get(b"filename")
        part_type = current["headers"].get(b"content-type")
        fields.setdefault(name.decode("utf-8", "replace"), []).append(
            Part(
                b"".join(current["chunks"]),
                filename.decode("utf-8", "replace") if filename is not None else None,
                part_type.decode("latin-1") if part_type else None,
            )
        )

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidInbound(f"malformed multipart body: {exc}") from exc
    if not fields:
        raise InvalidInbound("empty multipart body")
    return fields


# ---------------------------------------------------------------- fields to an Inbound


class _Fields:
    """Text fields decoded with the charset SendGrid names for each in `charsets`."""

    def __init__(self, parts: dict[str, list[Part]]) -> None:
        self.parts = parts
        charsets = self._json("charsets", "utf-8")
        self.charsets = charsets if isinstance(charsets, dict) else {}

    def raw(self, name: str) -> bytes | None:
        found = self.parts.get(name)
        return found[0].data if found else None

    def text(self, name: str, charset: str | None = None) -> str | None:
        data = self.raw(name)
        if data is None:
            return None
        return _decode(data, charset or str(self.charsets.get(name) or "utf-8"))

    def _json(self, name: str, charset: str) -> Any:
        value = self.text(name, charset)
        try:
            return json.loads(value) if value else None
        except json.JSONDecodeError:
            return None

    def envelope(self) -> dict[str, Any]:
        value = self._json("envelope", "utf-8")
        return value if isinstance(value, dict) else {}


def _decode(data: bytes, charset: str) -> str:
    try:
        return data.decode(charset, "replace")
    except LookupError:  # an unknown charset name: better some text than none
        return data.decode("utf-8", "replace")


def bare_address(value: str | None) -> str:
    return parseaddr(value or "")[1].strip().lower()


def inbound_from_parts(parts: dict[str, list[Part]]) -> Inbound:
    """The message in an Inbound Parse post; `InvalidInbound` for anything unusable."""
    try:
        return _inbound(_Fields(parts))
    except InvalidInbound:
        raise
    except Exception as exc:  # a MIME oddity no rule above foresaw: a 4xx with a log, not a 500
        log.exception("could not read an Inbound Parse post")
        raise InvalidInbound(f"could not read the message: {type(exc).__name__}: {exc}") from exc


def _inbound(fields: _Fields) -> Inbound:
    raw_email = fields.raw("email")
    if raw_email is not None:
        message = _parse_message(raw_email)
        body = _body_of(message)
        attachments = _attachments_of(message)
    else:
        message = _parse_message((fields.text("headers") or "").encode("utf-8") + b"\r\n\r\n")
        text, page = fields.text("text"), fields.text("html")
        body = new_text(text, page, subject=str(message.get("Subject") or ""))
        attachments = _attachment_fields(fields)
    sender = bare_address(message.get("From") or fields.text("from"))
    if not sender:
        sender = bare_address(str(fields.envelope().get("from") or ""))
    if not sender or "@" not in sender:
        raise InvalidInbound("no sender address (From)")
    local = _local_address(fields, message)
    if not local:
        raise InvalidInbound("no recipient address (envelope to / To)")
    subject = str(message.get("Subject") or fields.text("subject") or "")
    message_id = str(message.get("Message-ID") or "").strip()
    threading = {
        "Message-ID": message_id,  # a made-up id is for dedupe only, never for threading
        "In-Reply-To": str(message.get("In-Reply-To") or "").strip(),
        "References": " ".join(str(message.get("References") or "").split()),
    }
    meta: dict[str, object] = {"attachments": attachments} if attachments else {}
    return Inbound(
        channel=Channel.EMAIL,
        provider_message_id=message_id or _fallback_id(fields),
        remote_address=sender,
        local_address=local,
        body=body,
        intent=Intent.NO_REPLY if is_automatic(message, sender, local) else Intent.MESSAGE,
        subject=subject,
        headers={k: v for k, v in threading.items() if v},
        meta=meta,
    )


def _parse_message(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _local_address(fields: _Fields, message: EmailMessage) -> str:
    """The address the person wrote to: SendGrid's envelope recipient, else the first To."""
    envelope_to = fields.envelope().get("to")
    if isinstance(envelope_to, list) and envelope_to:
        return bare_address(str(envelope_to[0]))
    addresses = getaddresses([str(message.get("To") or fields.text("to") or "")])
    return addresses[0][1].lower() if addresses else ""


def _fallback_id(fields: _Fields) -> str:
    """No Message-ID: a stable id from what a redelivery repeats byte for byte."""
    digest = hashlib.sha256()
    for name in ("envelope", "headers", "email", "text", "html", "subject"):
        digest.update((fields.raw(name) or b"") + b"\x00")
    return f"<sha256-{digest.hexdigest()[:40]}@parley.invalid>"


def _body_of(message: EmailMessage) -> str:
    """The message's text: its plain part, else its HTML as text; charsets per MIME part."""
    part = message.get_body(preferencelist=("plain", "html"))
    if part is None:
        return ""
    try:
        content = part.get_content()
        text = content if isinstance(content, str) else ""
    except (LookupError, UnicodeError, ValueError):  # an unknown or lying charset declaration
        payload = part.get_payload(decode=True)
        raw = payload if isinstance(payload, bytes) else b""
        text = _decode(raw, part.get_content_charset() or "utf-8")
    return new_text(None, text) if part.get_content_subtype() == "html" else latest_reply(text)


def _attachments_of(message: EmailMessage) -> list[dict[str, object]]:
    return [
        {
            "name": part.get_filename() or "",
            "type": part.get_content_type(),
            "size": len(part.get_payload(decode=True) or b""),
        }
        for part in message.iter_attachments()
    ]


def _attachment_fields(fields: _Fields) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []
    for name, parts in sorted(fields.parts.items()):
        if name.startswith("attachment") and name[len("attachment") :].isdigit():
            part = parts[0]
            found.append(
                {"name": part.filename or name, "type": part.content_type, "size": len(part.data)}
            )
    return found


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
        or sender.split("@")[0] in _SYSTEM_SENDERS
        or sender == local
    )


# ---------------------------------------------------------------- replies


def reply_subject(subject: str | None) -> str:
    """`Re: <subject>` once, whatever prefixes the subject already carries."""
    stripped = _REPLY_PREFIX.sub("", subject or "").strip()
    return f"Re: {stripped}" if stripped else "Re: your message"


def reply_headers(inbound_headers: Mapping[str, str], local_address: str) -> dict[str, str]:
    """Threading headers for a reply, and our own Message-ID for the next turn."""
    domain = local_address.rpartition("@")[2] or "parley.invalid"
    headers = {
        "Message-ID": f"<parley-{secrets.token_hex(12)}@{domain}>",
        "Auto-Submitted": AUTO_REPLY,
    }
    parent = inbound_headers.get("Message-ID", "")
    if parent:
        references = inbound_headers.get("References", "").split()
        headers["In-Reply-To"] = parent
        if parent not in references:
            references.append(parent)
        headers["References"] = " ".join(references)
    return headers


def text_to_html(text: str) -> str:
    paragraphs = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    return "".join(f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>" for p in paragraphs)


class SendGridEmail:
    """The email channel. Sending goes through `sendgrid_rest`, imported only when an API key
    is configured (the SDK is a large part of an idle process otherwise)."""

    channel = Channel.EMAIL

    def __init__(self, api_key: str | None, api_base_url: str, timeout_s: float = 15.0) -> None:
        self._rest: SendGridRest | None = None
        if api_key:
            from service.channels.sendgrid_rest import SendGridRest

            self._rest = SendGridRest(api_key, api_base_url, timeout_s)

    @property
    def can_send(self) -> bool:
        return self._rest is not None

    def reply_envelope(
        self, subject: str | None, headers: dict[str, str], local_address: str
    ) -> tuple[str | None, dict[str, str]]:
        return reply_subject(subject), reply_headers(headers, local_address)

    async def send(self, outbound: Outbound) -> SendResult:
        assert self._rest is not None, "send() without credentials"
        return await self._rest.send(outbound)

    async def find_sent(self, outbound: Outbound, since: dt.datetime) -> list[str]:
        """SendGrid offers no cheap look-up; a resend carries the same Message-ID, which mail
        clients use to drop the duplicate."""
        raise LookupUnsupported

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------- simulating SendGrid


def inbound_parse_fields(
    text: str, from_: str, to: str, subject: str, message_id: str
) -> dict[str, str]:
    """A parsed-mode Inbound Parse post with the fields SendGrid sends for a plain-text mail."""
    date = format_datetime(dt.datetime.now(dt.UTC))
    headers = (
        f"Date: {date}\r\nFrom: {from_}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
        'Content-Type: text/plain; charset="UTF-8"\r\n'
    )
    return {
        "headers": headers,
        "dkim": "none",
        "to": to,
        "from": from_,
        "text": text,
        "sender_ip": "127.0.0.1",
        "spam_report": "",
        "envelope": json.dumps({"to": [to], "from": from_}),
        "attachments": "0",
        "subject": subject,
        "spam_score": "0.0",
        "charsets": json.dumps({k: "UTF-8" for k in ("to", "from", "subject", "text")}),
        "SPF": "none",
    }
