"""The words every layer shares: plain frozen values, no I/O, no Parley imports."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field


class Channel(enum.StrEnum):
    SMS = "sms"
    EMAIL = "email"
    WHATSAPP = "whatsapp"


class Sender(enum.StrEnum):
    USER = "user"
    ASSISTANT = "assistant"


class Author(enum.StrEnum):
    """Who wrote an assistant message."""

    MODEL = "model"
    OPERATOR = "operator"
    FIXED = "fixed"  # a fixed text such as HELP's answer, never from the model


class FixedText(enum.StrEnum):
    """Which fixed text an assistant message authored `fixed` is."""

    HELP = "help"
    GREETING = "greeting"  # a profile's greeting, before a conversation's first reply
    AFTER_HOURS = "after_hours"  # a profile's after-hours reply, once per closed period


class CallPurpose(enum.StrEnum):
    """Why the model was called (`assistant_call.purpose`)."""

    REPLY = "reply"
    SUMMARY = "summary"  # folding old turns into the conversation's summary; never sent


class Intent(enum.StrEnum):
    """What an inbound message asks of Parley, decided before anything is stored."""

    MESSAGE = "message"  # an ordinary message for the assistant
    OPT_OUT = "opt_out"  # STOP and friends: no reply, ever, until opt-in
    OPT_IN = "opt_in"  # START, YES, UNSTOP: replies resume, no answer to the keyword itself
    HELP = "help"  # HELP, INFO: the fixed help text
    NO_REPLY = "no_reply"  # stored but never answered (auto-replies, bounces, loops)
    UNVERIFIED = "unverified"  # stored, never answered: the sender failed authentication
    UNREADABLE = "unreadable"  # stored, never answered: no text could be read in time


class Delivery(enum.StrEnum):
    """Life of one outbound message; the order matters (see `DELIVERY_RANK`)."""

    PENDING = "pending"  # stored, not handed to the provider yet
    SENDING = "sending"  # handed over; outcome unknown until recorded (ambiguous on crash)
    NOT_SENT = "not_sent"  # no provider credentials: recorded and shown, never sent
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"  # WhatsApp: the person opened it
    UNDELIVERED = "undelivered"
    FAILED = "failed"


# Status callbacks may arrive out of order: a status only moves to a higher rank.
# `read` ranks above `delivered`; `failed`/`undelivered` rank with `read`, so nothing moves a
# final state (a `read` never undoes a failure, a failure never undoes a `read`).
DELIVERY_RANK: dict[Delivery, int] = {
    Delivery.PENDING: 0,
    Delivery.SENDING: 1,
    Delivery.NOT_SENT: 2,
    Delivery.QUEUED: 2,
    Delivery.SENT: 3,
    Delivery.DELIVERED: 4,
    Delivery.READ: 5,
    Delivery.UNDELIVERED: 5,
    Delivery.FAILED: 5,
}


class InboundState(enum.StrEnum):
    """What became of an inbound message."""

    RECEIVED = "received"  # waiting for its reply
    ANSWERED = "answered"
    NOT_ANSWERED = "not_answered"  # by design: opt-out keywords, paused, auto-replies
    RATE_LIMITED = "rate_limited"
    FAILED = "failed"


class CallStatus(enum.StrEnum):
    """How a model call ended (`assistant_call.status`)."""

    OK = "ok"  # answered, and the answer stored
    ERROR = "error"
    # Answered, but a newer message of the person arrived before the answer was stored: the
    # answer was dropped and the model asked again with every waiting message (SPEC §12).
    # Not the worker's `Superseded` (a worker that lost its claim).
    SUPERSEDED = "superseded"


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class MediaState(enum.StrEnum):
    """What became of one attachment of a message (MMS media)."""

    DECLARED = "declared"  # stored from the webhook, not fetched yet
    FETCHED = "fetched"  # fetched; its size is known
    UNAVAILABLE = "unavailable"  # the provider answered 4xx (gone, forbidden)
    TOO_LARGE = "too_large"  # over MEDIA_MAX_BYTES: not downloaded past the limit
    NOT_FETCHED = "not_fetched"  # not on the provider's media host: described, never fetched


@dataclass(frozen=True)
class MediaItem:
    """One attachment as stored with its message: where it is, what it is, and (once the
    worker has looked) how big it is. Never its bytes."""

    url: str
    content_type: str
    size: int | None = None  # bytes, learned at fetch time
    state: MediaState = MediaState.DECLARED

    def to_json(self) -> dict[str, object]:
        return {
            "url": self.url,
            "content_type": self.content_type,
            "size": self.size,
            "state": self.state.value,
        }

    @classmethod
    def from_json(cls, value: object) -> MediaItem | None:
        """A stored item; None for anything that is not one (never raises on old rows)."""
        if not isinstance(value, dict) or not isinstance(value.get("url"), str):
            return None
        size = value.get("size")
        try:
            state = MediaState(value.get("state", MediaState.DECLARED))
        except ValueError:
            state = MediaState.DECLARED
        return cls(
            url=value["url"],
            content_type=str(value.get("content_type") or "application/octet-stream"),
            size=size if isinstance(size, int) and not isinstance(size, bool) else None,
            state=state,
        )


def media_from_json(value: object) -> tuple[MediaItem, ...]:
    """A message's stored media list (the `message.media` column)."""
    if not isinstance(value, list):
        return ()
    return tuple(item for item in map(MediaItem.from_json, value) if item is not None)


@dataclass(frozen=True)
class Inbound:
    """One message as a channel parsed it, before it is stored."""

    channel: Channel
    provider_message_id: str
    remote_address: str
    local_address: str
    body: str
    intent: Intent = Intent.MESSAGE
    subject: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)
    display_name: str | None = None  # what the sender calls themselves (WhatsApp ProfileName)
    media: tuple[MediaItem, ...] = ()  # MMS / WhatsApp attachments, in the provider's order
    # Without PUBLIC_BASE_URL: the scheme and host a signed webhook came to (its callbacks')
    reached_at: str | None = None


@dataclass(frozen=True)
class Turn:
    """One message as the assistant sees it. `images` (base64 `data:` URLs) only on the turn
    they arrive in; earlier turns carry their attachments as text notes in `body`."""

    sender: Sender
    body: str
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outbound:
    """One message to hand to a channel."""

    channel: Channel
    to: str
    from_: str
    body: str
    subject: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    last_inbound_at: dt.datetime | None = None  # the person's latest message (WhatsApp's window)
    part: int = 1  # which part of its reply, from 1 (a reply past the channel's limit is cut)
    reached_at: str | None = None  # the conversation's `public_base_url` (no PUBLIC_BASE_URL)


@dataclass(frozen=True)
class SendResult:
    provider_message_id: str | None
    status: Delivery
    note: str | None = None  # with `Delivery.NOT_SENT`: why the channel did not send it


class SendError(Exception):
    """A provider refused or failed a send; `retryable` says whether trying again may help."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        ambiguous: bool = False,
        retry_after_s: float | None = None,
        code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.ambiguous = ambiguous  # the request may have been accepted: look before resending
        self.retry_after_s = retry_after_s
        self.code = code

    @classmethod
    def no_answer(cls, provider: str) -> SendError:
        """Our time limit ran out after the request went out: it may have been accepted."""
        return cls(f"{provider} did not answer in time", retryable=True, ambiguous=True)


class RecipientOptedOut(SendError):
    """The provider says the recipient unsubscribed (Twilio 21610)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message, retryable=False, code=code)
