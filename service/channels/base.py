"""The `Channel` seam: what the worker needs from a provider, and nothing provider-specific.

A channel sends one outbound message, and where the provider allows it, tells whether an
earlier send whose outcome was lost (timeout, crash) actually went out, so it is never doubled.
"""

from __future__ import annotations

import datetime as dt
from typing import Protocol

from service.types import Channel, Outbound, SendResult


class ChannelClient(Protocol):
    channel: Channel

    @property
    def can_send(self) -> bool:
        """False without provider credentials: replies are recorded and marked not sent."""
        ...

    async def send(self, outbound: Outbound) -> SendResult:
        """Hand one message to the provider; raises `SendError` (or a subclass)."""
        ...

    async def find_sent(self, outbound: Outbound, since: dt.datetime) -> list[str]:
        """Provider ids of messages like this one accepted since about `since`, oldest first
        (an earlier identical reply may be among them: the caller skips the ids it knows).

        Raises `LookupUnsupported` where the provider offers no way to tell."""
        ...

    def reply_envelope(
        self, subject: str | None, headers: dict[str, str], local_address: str
    ) -> tuple[str | None, dict[str, str]]:
        """Subject and headers of a reply, sent from `local_address`, to a message with this
        subject and these headers (email threading; nothing for SMS)."""
        ...

    async def close(self) -> None: ...


class LookupUnsupported(Exception):
    """The provider cannot say whether an earlier send went out."""
