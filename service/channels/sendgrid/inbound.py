"""SendGrid Inbound Parse (parsed and raw mode): HTTP Basic, the multipart body, charsets,
and the header-level read of a post (`Envelope`): sender, recipient, ids, whether to answer.
The body is extracted later, in a child process (`extraction`), once the mail is known new.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import secrets
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import getaddresses, parseaddr
from typing import TYPE_CHECKING, Any

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

from service import storable
from service.channels.base import InvalidWebhook
from service.channels.sendgrid.extraction import Extracted, MailContent
from service.channels.sendgrid.limits import (
    BOUNDED,
    MAX_AUTH_FIELD_CHARS,
    MAX_FORM_PART_HEADER_LINE_BYTES,
    MAX_FORM_PART_HEADERS,
    MAX_FORM_PARTS,
    MAX_HEADER_BLOCK_BYTES,
    MAX_HEADER_CHARS,
    MAX_HTML_CHARS,
    MAX_MESSAGE_ID_CHARS,
    MAX_MIME_BYTES,
    MAX_REFERENCES,
    MAX_SUBJECT_CHARS,
    MAX_TEXT_CHARS,
    cap_header_block,
    decode_text,
    header_text,
    header_token,
    split_head,
)
from service.channels.sendgrid.mime import is_automatic, message_ids
from service.types import Channel, Inbound, Intent

log = logging.getLogger(__name__)

_DKIM_RESULT = re.compile(r"@([^\s:,{}@]{1,253})\s{0,5}:\s{0,5}([a-z]{1,16})")
MAX_JSON_FIELD_CHARS = 64 * 1024  # `envelope`, `charsets`: a few hundred bytes in practice


class InvalidInbound(InvalidWebhook):
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
    """One form field: the first bytes of its value (as many as anything reads, `_kept_bytes`),
    its whole size, and for the fields a missing Message-ID is made from, a digest of it all."""

    data: bytes
    size: int
    filename: str | None = None
    content_type: str | None = None
    digest: bytes = b""


# Each field Parley reads and how many characters of it (`_Fields.text`); as a post streams
# in, four bytes a character are kept of it (a charset uses at most 4 bytes a character), and
# of the raw mail what `cap_mime` keeps plus the byte that tells it the mail was longer. Of any
# other field, and of a second field of the same name, nothing is kept; attachments are
# counted.
_FIELD_CHARS = {
    "text": MAX_TEXT_CHARS,
    "html": MAX_HTML_CHARS,
    "headers": MAX_HEADER_BLOCK_BYTES,
    "envelope": MAX_JSON_FIELD_CHARS,
    "charsets": MAX_JSON_FIELD_CHARS,
    "from": MAX_HEADER_CHARS,
    "to": MAX_HEADER_CHARS,
    "subject": MAX_HEADER_CHARS,
    "SPF": MAX_HEADER_CHARS,
    "dkim": MAX_AUTH_FIELD_CHARS,
}
_MIME_KEPT_BYTES = MAX_MIME_BYTES + 1
_DIGESTED = ("envelope", "headers", "email", "text", "html", "subject")
# Bare-LF framed posts (SendGrid's sample sender) are buffered whole to be reframed.
MAX_BARE_LF_BYTES = 1024 * 1024


def _kept_bytes(name: str) -> int:
    return _MIME_KEPT_BYTES if name == "email" else _FIELD_CHARS.get(name, 0) * 4


class _FormFields:
    """python-multipart's callbacks, collecting each part's headers, name, size and its kept
    bytes; at most `MAX_FORM_PARTS` parts (python-multipart bounds each part's headers:
    `FormReader`). Memory stays near the kept bytes whatever the body's size (a 30 MB mail keeps
    10 MB of it)."""

    def __init__(self) -> None:
        self.fields: dict[str, list[Part]] = {}
        self._count = 0
        self._headers: dict[bytes, bytes] = {}
        self._chunks: list[bytes] = []
        self._name, self._value = b"", b""
        self._field, self._room, self._size = "", 0, 0
        self._filename: str | None = None
        self._digest: hashlib._Hash | None = None

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        if self._count >= MAX_FORM_PARTS:
            raise InvalidInbound(f"more than {MAX_FORM_PARTS} form parts")
        self._headers, self._chunks = {}, []
        self._name, self._value = b"", b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._name.lower()] = self._value
        self._name, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, disposition = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = disposition.get(b"name")
        if name is None:
            raise InvalidInbound("a multipart part has no field name")
        self._field = name.decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        self._filename = filename.decode("utf-8", "replace") if filename is not None else None
        first = self._field not in self.fields  # only a field's first part is ever read
        self._room, self._size = (_kept_bytes(self._field) if first else 0), 0
        self._digest = hashlib.sha256() if self._field in _DIGESTED else None

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._digest is not None:
            self._digest.update(data[start:end])
        if self._room > 0:
            kept = data[start : min(end, start + self._room)]
            self._chunks.append(kept)
            self._room -= len(kept)

    def _end(self) -> None:
        part_type = self._headers.get(b"content-type")
        self.fields.setdefault(self._field, []).append(
            Part(
                b"".join(self._chunks),
                self._size,
                self._filename,
                part_type.decode("latin-1") if part_type else None,
                self._digest.digest() if self._digest is not None else b"",
            )
        )
        self._chunks = []
        self._count += 1


# python-multipart logs what it finds wrong in a body (a warning with the offending byte) before
# it raises; the refusal's own line says it, once (SPEC §9).
logging.getLogger("python_multipart").setLevel(logging.ERROR)


# Bytes of a body's start that tell its framing: a real body's first delimiter comes at once.
_FRAMING_SEEN_BYTES = 64 * 1024


class FormReader:
    """An Inbound Parse body read as it streams in (`feed` each chunk, then `fields`): the
    body itself is never held, only each field's kept bytes (`_FormFields`).

    python-multipart finds boundaries with `bytes.find`: ~0.1 ms a 64 KB chunk of part data
    whatever the bytes, so it runs on the event loop; part headers, which it walks more
    slowly, are capped (`MAX_FORM_PART_HEADERS` lines of `MAX_FORM_PART_HEADER_LINE_BYTES`).
    A body framed with bare LF line ends (`crlf_framing`) is buffered whole, up to
    `MAX_BARE_LF_BYTES`, and reframed."""

    def __init__(self, content_type: str) -> None:
        kind, options = parse_options_header(content_type[:MAX_HEADER_CHARS])
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise InvalidInbound("expected multipart/form-data with a boundary")
        self._boundary = boundary
        self._collected = _FormFields()
        try:
            self._parser = MultipartParser(
                boundary,
                self._collected.callbacks(),
                max_header_count=MAX_FORM_PART_HEADERS,
                max_header_size=MAX_FORM_PART_HEADER_LINE_BYTES,
            )
        except FormParserError as exc:  # a boundary over its 256 bytes, say
            raise InvalidInbound(f"unusable multipart boundary: {exc}") from exc
        self._head: bytes | None = b""  # the body's first bytes, until its framing is known
        self._bare_lf: list[bytes] | None = None
        self._bare_lf_bytes = 0

    def feed(self, chunk: bytes) -> None:
        if self._bare_lf is not None:
            self._bare_lf.append(chunk)
            self._bare_lf_bytes += len(chunk)
            if self._bare_lf_bytes > MAX_BARE_LF_BYTES:
                raise InvalidInbound(f"a post framed with bare LF over {MAX_BARE_LF_BYTES} bytes")
            return
        if self._head is not None:
            self._head += chunk
            framing = _framing(self._head, self._boundary)
            if framing is None and len(self._head) < _FRAMING_SEEN_BYTES:
                return
            chunk, self._head = self._head, None
            if framing == "lf":
                self._bare_lf = []
                self.feed(chunk)
                return
        self._write(chunk)

    def fields(self) -> dict[str, list[Part]]:
        if self._bare_lf is not None:
            self._write(crlf_framing(b"".join(self._bare_lf), self._boundary))
        elif self._head:
            self._write(self._head)
        try:
            self._parser.finalize()
        except FormParserError as exc:
            raise InvalidInbound(f"malformed multipart body: {exc}") from exc
        if not self._collected.fields:
            raise InvalidInbound("empty multipart body")
        return self._collected.fields

    def _write(self, data: bytes) -> None:
        try:
            self._parser.write(data)
        except FormParserError as exc:
            raise InvalidInbound(f"malformed multipart body: {exc}") from exc


def _framing(head: bytes, boundary: bytes) -> str | None:
    """ "crlf" or "lf" once the body's first delimiter line shows which it uses; None while
    too few bytes have come to tell."""
    start = len(head) - len(head.lstrip(b"\r\n"))
    delimiter = b"--" + boundary
    if len(head) < start + len(delimiter) + 1:
        return None
    return "lf" if head.startswith(delimiter + b"\n", start) else "crlf"


def crlf_framing(body: bytes, boundary: bytes) -> bytes:
    """The body with CRLF framing, which python-multipart requires (RFC 7578). SendGrid's own
    sample sender (`sendgrid.helpers.inbound.send`) posts its sample files with bare LF line
    ends; only the framing is rewritten (delimiter lines and part headers), values keep their
    bytes. Linear: one split, one join."""
    delimiter = b"--" + boundary
    start = len(body) - len(body.lstrip(b"\r\n"))
    if not body.startswith(delimiter + b"\n", start):
        return body
    framed = []
    for section in body[start + len(delimiter) :].split(b"\n" + delimiter):
        if section.startswith(b"--"):
            framed.append(b"--\r\n")
            break
        head, _, value = section.removeprefix(b"\n").partition(b"\n\n")
        head = head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        framed.append(b"\r\n" + head + b"\r\n\r\n" + value)
    return delimiter + (b"\r\n" + delimiter).join(framed)


# ---------------------------------------------------------------- fields to an Envelope


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
        """The field as text, cut to its `_FIELD_CHARS` (its bytes first: a charset uses at
        most 4 bytes a character), so no decoder or parser ever sees more."""
        data = self.raw(name)
        if data is None:
            return None
        limit = _FIELD_CHARS[name]
        charset = charset or str(self.charsets.get(name) or "utf-8")
        return decode_text(data[: limit * 4], charset)[:limit]

    def _json(self, name: str, charset: str) -> Any:
        value = self.text(name, charset)
        try:
            return json.loads(value) if value else None
        except (json.JSONDecodeError, RecursionError):
            return None

    def envelope(self) -> dict[str, Any]:
        value = self._json("envelope", "utf-8")
        return value if isinstance(value, dict) else {}


def bare_address(value: object) -> str:
    """The address in a header value, lower-cased. Line breaks (from a decoded display name)
    are spaces; any other control character is kept, so `_usable` refuses it rather than
    reading a different address."""
    text = str(value or "").replace("\r", " ").replace("\n", " ")
    return parseaddr(text)[1].strip().lower()


def _usable(address: str, role: str) -> str:
    """The address, or `InvalidInbound` if it could not be stored or written to."""
    try:
        storable.address(address, f"the {role} address")  # refused before any costly parsing
    except storable.Unstorable as exc:
        raise InvalidInbound(str(exc)) from exc
    if address != header_token(address):
        raise InvalidInbound(f"{role} address contains spaces or control characters")
    return address


@dataclass(frozen=True)
class Envelope:
    """An Inbound Parse post read down to its headers: enough to deduplicate the mail and judge
    its sender before its body, the costly part, is extracted (`extraction.Extractor`)."""

    provider_message_id: str
    remote_address: str
    local_address: str
    subject: str
    headers: dict[str, str]
    intent: Intent
    content: MailContent
    meta: dict[str, object] = field(default_factory=dict)
    attachments: list[dict[str, object]] = field(default_factory=list)

    def inbound(self, extracted: Extracted) -> Inbound:
        attachments = self.attachments or extracted.attachments
        intent, meta = self.intent, self.meta
        if intent is Intent.MESSAGE and extracted.problem and not extracted.body.strip():
            # Asking the model about a mail nobody could read answers the subject line alone.
            intent = Intent.UNREADABLE
            meta = {**meta, "not_answered_reason": f"no readable text: {extracted.problem}"}
        return Inbound(
            channel=Channel.EMAIL,
            provider_message_id=self.provider_message_id,
            remote_address=self.remote_address,
            local_address=self.local_address,
            body=storable.text(extracted.body),
            intent=intent,
            subject=self.subject,
            headers=self.headers,
            meta={**meta, **({"attachments": attachments} if attachments else {})},
        )


def envelope_of(parts: dict[str, list[Part]]) -> Envelope:
    """The header-level read of an Inbound Parse post's fields (`FormReader`);
    `InvalidInbound` for anything unusable.

    Bounded work: only the capped top-level header block is parsed (`BOUNDED`); the body stays
    unread for `extraction`."""
    fields = _Fields(parts)
    try:
        return _envelope(fields)
    except InvalidInbound:
        raise
    except Exception as exc:  # a header oddity no rule above foresaw: a 4xx, not a 500
        detail = header_text(f"{type(exc).__name__}: {exc}")[:200]
        raise InvalidInbound(f"could not read the message headers: {detail}") from exc


def _envelope(fields: _Fields) -> Envelope:
    raw_email = fields.raw("email")
    if raw_email is not None:
        message = _parse_head(split_head(raw_email)[0])
        content = MailContent(mime=raw_email)
        attachments = []
    else:
        message = _parse_head((fields.text("headers") or "").encode())
        content = MailContent(plain=fields.text("text"), html=fields.text("html"))
        attachments = _attachment_fields(fields)
    sender = bare_address(message.get("From") or fields.text("from"))
    if not sender:
        sender = bare_address(fields.envelope().get("from"))
    if not sender or "@" not in sender:
        raise InvalidInbound("no sender address (From)")
    local = _local_address(fields, message)
    if not local:
        raise InvalidInbound("no recipient address (envelope to / To)")
    message_id, provider_id = _message_ids(message, fields)
    threading = {
        "Message-ID": message_id,  # a made-up id is for dedupe only, never for threading
        "In-Reply-To": " ".join(message_ids(message.get("In-Reply-To"))),
        "References": " ".join(message_ids(message.get("References"))[-MAX_REFERENCES:]),
    }
    intent, meta = _judged(fields, message, _usable(sender, "sender"), _usable(local, "recipient"))
    subject = message.get("Subject") or fields.text("subject")
    return Envelope(
        provider_message_id=provider_id,
        remote_address=sender,
        local_address=local,
        subject=header_text(str(subject or ""))[:MAX_SUBJECT_CHARS],
        headers={k: v for k, v in threading.items() if v},
        intent=intent,
        content=content,
        meta=meta,
        attachments=attachments,
    )


def _parse_head(head: bytes) -> EmailMessage:
    message = BytesHeaderParser(policy=BOUNDED).parsebytes(cap_header_block(head))
    assert isinstance(message, EmailMessage)
    return message


def _message_ids(message: EmailMessage, fields: _Fields) -> tuple[str, str]:
    """The Message-ID to thread by ("" if none or too long) and the id to deduplicate by: the
    Message-ID (an over-long one is digested where every provider id is, `storable`), or a
    digest of the post without one."""
    message_id = header_token(str(message.get("Message-ID") or ""))
    if not message_id:
        return "", _fallback_id(fields)
    if len(message_id) > MAX_MESSAGE_ID_CHARS:
        return "", message_id
    return message_id, message_id


def _judged(
    fields: _Fields, message: EmailMessage, sender: str, local: str
) -> tuple[Intent, dict[str, object]]:
    """Whether to answer: not a sender that failed authentication, nor automatic mail."""
    reason = sender_doubt(fields.text("SPF"), fields.text("dkim"), sender)
    if reason:
        return Intent.UNVERIFIED, {"not_answered_reason": reason}
    if is_automatic(message, sender, local):
        return Intent.NO_REPLY, {}
    return Intent.MESSAGE, {}


def sender_doubt(spf: str | None, dkim: str | None, sender: str) -> str | None:
    """Why the From address is not believed, or None (SPEC §9).

    SendGrid's `SPF` is one word (`pass`, `fail`, `softfail`, `neutral`, `none`, …); its `dkim`
    lists each signature's domain and result: `{@example.com : pass, @mail.example : fail}`,
    or `none`. A mail whose SPF is `fail` or `softfail` is believed only with a DKIM pass for
    the From address's domain (or a parent or child of it, DMARC's relaxed alignment). Mail
    without an `SPF` field is judged as before: not every setup posts it."""
    words = (spf or "").split()
    result = words[0].lower() if words else ""
    if result not in ("fail", "softfail"):
        return None
    domain = sender.rpartition("@")[2]
    passed = [d.lower().rstrip(".") for d, r in _DKIM_RESULT.findall(dkim or "") if r == "pass"]
    if any(_aligned(signer, domain) for signer in passed):
        return None
    return f"sender not verified: SPF {result} and no DKIM pass for {domain}"


def _aligned(signer: str, domain: str) -> bool:
    return signer == domain or domain.endswith("." + signer) or signer.endswith("." + domain)


def _local_address(fields: _Fields, message: EmailMessage) -> str:
    """The address the person wrote to: SendGrid's envelope recipient, else the first To."""
    envelope_to = fields.envelope().get("to")
    if isinstance(envelope_to, list) and envelope_to:
        return bare_address(envelope_to[0])
    to = message.get("To") or fields.text("to") or ""
    addresses = getaddresses([header_text(str(to))])
    return addresses[0][1].lower() if addresses else ""


def _fallback_id(fields: _Fields) -> str:
    """No Message-ID: a stable id from what a redelivery repeats byte for byte."""
    digest = hashlib.sha256()
    for name in _DIGESTED:
        found = fields.parts.get(name)
        digest.update((_whole_or_digest(found[0]) if found else b"") + b"\x00")
    return f"<sha256-{digest.hexdigest()[:40]}@parley.invalid>"


def _whole_or_digest(part: Part) -> bytes:
    """The value itself when it was kept whole (every real mail without a Message-ID: its id
    stays what it was before posts were read as they stream), else the digest of all of it."""
    return part.data if part.size == len(part.data) else part.digest


def _attachment_fields(fields: _Fields) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []
    for name, parts in sorted(fields.parts.items()):
        if name.startswith("attachment") and name[len("attachment") :].isdigit():
            part = parts[0]
            found.append(
                {
                    "name": header_text(part.filename or name)[:MAX_HEADER_CHARS],
                    "type": header_text(part.content_type or "")[:MAX_HEADER_CHARS] or None,
                    "size": part.size,
                }
            )
    return found
