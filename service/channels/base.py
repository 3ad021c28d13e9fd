"""The channel plugin: everything Parley knows about one channel, behind one protocol.

A plugin owns its webhook routes (reading, authenticating and parsing a provider's request),
its outbound side (limits and splitting, send, the lookup of a send whose outcome was lost),
its address rules and its display name. It never touches the database: each webhook handler
is given an `Intake` (implemented by the web layer) that records what the plugin parsed, so
channels import neither store, queue, reply nor web.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from starlette.requests import Request
from starlette.responses import Response

from service.types import Channel, Delivery, Inbound, MediaItem, Outbound, SendResult


class LookupUnsupported(Exception):
    """The provider cannot say whether an earlier send went out."""


class InvalidWebhook(ValueError):
    """An authenticated request that is not a usable message or status callback (a 400)."""


class BadAddress(ValueError):
    """Text that is a channel's kind of address, but not a usable one."""


class Refused(Exception):
    """A webhook request refused with `status`: the web layer logs one warning line, counts
    it and answers `reason` as plain text, with `headers` (e.g. `WWW-Authenticate`)."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


class FetchFailed(Exception):
    """The provider could not hand over a message's attachments now (5xx, 429, timeout,
    connection): the reply job is retried like any provider failure."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Attachment:
    """One attachment after the channel looked at it: the stored item with what was learned
    (size, state) and, where asked for, its bytes (kept in memory for one model call only)."""

    item: MediaItem
    content: bytes | None = None


@dataclass(frozen=True)
class StatusUpdate:
    """A provider's delivery report, mapped onto Parley's forward-only states."""

    provider_message_id: str
    status: Delivery
    error: str | None
    # The channel the message went out on, where one route serves several (Twilio's status
    # callback serves SMS and WhatsApp); None: the route's own plugin.
    channel: Channel | None = None


class Intake(Protocol):
    """What a plugin's webhook handler may do with the database, through the web layer. Bound
    to the plugin's channel and to one request (its timing, log line and metric labels)."""

    async def record(self, inbound: Inbound) -> None:
        """Store the message with its reply job and wait for the commit; raises `Refused`
        (400 for what cannot be stored, 503 while the database is unavailable)."""
        ...

    async def update_delivery(self, update: StatusUpdate) -> bool:
        """Apply a delivery report; False if it moved nothing. Raises `Refused` (503)."""
        ...

    async def is_stored(self, provider_message_id: str) -> bool:
        """Whether this message is already stored (counted and logged as a redelivery)."""
        ...

    async def recent_replies(self, remote_address: str, local_address: str) -> list[str]:
        """Parley's latest replies in that conversation, newest first."""
        ...


Handler = Callable[[Request, Intake], Awaitable[Response]]


@dataclass(frozen=True)
class WebhookRoute:
    """A webhook a plugin owns. The web layer mounts it at `path` and `path/` (POST), and
    labels its metrics with the plugin's channel and `kind`."""

    path: str
    handler: Handler
    kind: Literal["message", "status"] = "message"


class ChannelPlugin(Protocol):
    @property
    def channel(self) -> Channel: ...

    @property
    def display_name(self) -> str:
        """What a person calls the channel ("SMS", "Email"): the transcript, the CLI."""
        ...

    @property
    def max_chars(self) -> int | None:
        """The longest part a reply goes out as; None: a reply goes out as one message."""
        ...

    @property
    def style(self) -> str:
        """One line for the system prompt: how to write on this channel."""
        ...

    # ------------------------------------------------------------ inbound

    def routes(self) -> Sequence[WebhookRoute]: ...

    def normalise_address(self, text: str) -> str | None:
        """`text` as this channel stores a remote address; None if it is not this channel's
        kind of address; `BadAddress` if it is, but unusable."""
        ...

    # ------------------------------------------------------------ outbound

    @property
    def can_send(self) -> bool:
        """False without provider credentials: replies are recorded and marked not sent."""
        ...

    def split(self, text: str) -> list[str]:
        """The parts a reply goes out as, in order."""
        ...

    def reply_envelope(
        self, subject: str | None, headers: dict[str, str], local_address: str
    ) -> tuple[str | None, dict[str, str]]:
        """Subject and headers of a reply, sent from `local_address`, to a message with this
        subject and these headers (email threading; nothing for SMS)."""
        ...

    async def send(self, outbound: Outbound) -> SendResult:
        """Hand one message to the provider; raises `SendError` (or a subclass)."""
        ...

    async def find_sent(self, outbound: Outbound, since: dt.datetime) -> list[str]:
        """Provider ids of messages like this one accepted since about `since`, oldest first
        (an earlier identical reply may be among them: the caller skips the ids it knows).

        Raises `LookupUnsupported` where the provider offers no way to tell."""
        ...

    async def fetch_attachments(
        self, media: Sequence[MediaItem], want_content: Callable[[MediaItem], bool]
    ) -> list[Attachment]:
        """Each attachment of a message, in order, with its size and state, and the bytes of
        those `want_content` asks for; items the channel cannot fetch come back described.
        Raises `FetchFailed` when a later try may succeed."""
        ...

    async def close(self) -> None: ...


def described(media: Sequence[MediaItem]) -> list[Attachment]:
    """`fetch_attachments` of a channel that fetches nothing: every item as it is."""
    return [Attachment(item) for item in media]
