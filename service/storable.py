"""Text the database will store, whatever arrived: pure functions, no I/O.

Every channel's `Inbound` passes through `inbound()` on its way into the inbound writer, the one
door to the conversation and message tables, so no webhook can hand the database a value it
refuses. PostgreSQL refuses NUL in text and values longer than a `VARCHAR(n)`; a lone surrogate
cannot be encoded at all (asyncpg and sqlite3 both raise). SQLite accepts NUL and long values, so
a gap here would show only in production, as a 500 on every retry of the same message.

What is done to each value, and why:
- bodies keep tab, LF and CR and lose every other control character (Unicode category Cc);
- addresses, ids, the subject and header values lose all of them (a line break in a header
  value is how header injection starts): line breaks and tabs become one space in the
  subject and header values, and disappear from addresses and ids;
- lone surrogates become U+FFFD (a surrogate pair that arrived as two code points is joined);
- a provider id longer than its column is replaced by a digest of itself, so deduplication still
  works: the same long id twice is one message;
- an address longer than its column is refused (`Unstorable`, a 400): cutting it would merge
  different senders into one conversation, and no provider sends such an address;
- the subject and header values are cut to a bound (at a space where there is one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re

from service.types import Inbound

# The columns an inbound value reaches (service/models.py):
MAX_PROVIDER_ID = 255  # message.provider_message_id, delivery_report.provider_message_id
MAX_ADDRESS = 320  # conversation.remote_address, conversation.local_address (RFC 5321 path)
# message.subject, message.error and message.headers (JSON) are unbounded in the database; these
# bounds keep them usable: a subject is one header line (RFC 5322: 998), a References chain of a
# long thread stays whole, an error stays one readable line.
MAX_SUBJECT = 998
MAX_HEADER_VALUE = 8000
MAX_HEADER_NAME = 100
MAX_ERROR = 1000
# conversation.summary (VARCHAR(50)) is cut by `conversation.summary_of` from the cleaned body;
# channel, sender, intent and status (VARCHAR(16)) are Parley's own enum values.

_SURROGATES = re.compile("[\ud800-\udfff]")
_CONTROLS_BUT_LINE_BREAKS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LINE_BREAKS = re.compile("[\t\n\r]+")
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")


class Unstorable(ValueError):
    """An inbound value no cleaning makes storable: the request is refused with 400."""


def valid_unicode(value: str) -> str:
    """`value` with each lone surrogate as U+FFFD; a split surrogate pair becomes its character."""
    if not _SURROGATES.search(value):
        return value
    return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def text(value: str) -> str:
    """A body: valid Unicode, no control characters but tab, LF and CR."""
    return _CONTROLS_BUT_LINE_BREAKS.sub("", valid_unicode(value))


def line(value: str, limit: int) -> str:
    """A subject or header value: one line, no control characters, at most `limit` characters."""
    flat = _LINE_BREAKS.sub(" ", text(value)).strip()
    if len(flat) <= limit:
        return flat
    cut = flat.rfind(" ", limit // 2, limit + 1)  # keep whole words (whole ids in References)
    return flat[: cut if cut > 0 else limit].rstrip()


def _bare(value: str) -> str:
    return _CONTROLS.sub("", valid_unicode(value)).strip()


def provider_id(value: str) -> str:
    """A provider's message id as stored: no control characters; over 255 characters, a
    stable digest of itself (`sha256:` and 64 hex digits), so a redelivery still matches."""
    bare = _bare(value)
    if len(bare) <= MAX_PROVIDER_ID:
        return bare
    return "sha256:" + hashlib.sha256(bare.encode("utf-8")).hexdigest()


def address(value: str, what: str) -> str:
    """An address as stored, or `Unstorable` when it is empty or longer than its column."""
    bare = _bare(value)
    if not bare:
        raise Unstorable(f"{what} is empty")
    if len(bare) > MAX_ADDRESS:
        raise Unstorable(f"{what} has {len(bare)} characters, more than {MAX_ADDRESS}")
    return bare


def json_value(value: object) -> object:
    """A JSON document as stored: every string (keys too) a clean bounded line, no NaN or
    infinity (PostgreSQL's json refuses them)."""
    if isinstance(value, str):
        return line(value, MAX_HEADER_VALUE)
    if isinstance(value, dict):
        return {line(str(k), MAX_HEADER_NAME): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def error(value: str | None) -> str | None:
    """A provider's error text as stored: one bounded line, None when nothing is left."""
    return (line(value, MAX_ERROR) or None) if value else None


def inbound(message: Inbound) -> Inbound:
    """`message` with every value storable; `Unstorable` when an address or the id cannot be."""
    message_id = provider_id(message.provider_message_id)
    if not message_id:
        raise Unstorable("the provider message id is empty")
    return dataclasses.replace(
        message,
        provider_message_id=message_id,
        remote_address=address(message.remote_address, "the sender address"),
        local_address=address(message.local_address, "the recipient address"),
        body=text(message.body),
        subject=None if message.subject is None else line(message.subject, MAX_SUBJECT),
        headers={
            line(k, MAX_HEADER_NAME): line(v, MAX_HEADER_VALUE) for k, v in message.headers.items()
        },
        meta={line(k, MAX_HEADER_NAME): json_value(v) for k, v in message.meta.items()},
        display_name=None if message.display_name is None else line(message.display_name, 255),
        media=tuple(
            dataclasses.replace(
                item,
                url=line(item.url, MAX_HEADER_VALUE),
                content_type=line(item.content_type, MAX_HEADER_NAME),
            )
            for item in message.media
        ),
    )
