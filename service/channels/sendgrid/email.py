"""Email over SendGrid: the plugin. Inbound Parse is read by `inbound` (headers first), the
body by `extraction` (a bounded child process this plugin owns), replies are threaded by
`mime` and sent by `rest`."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from service.byte_budget import ByteBudget
from service.channels.base import (
    Attachment,
    BadAddress,
    Intake,
    LookupUnsupported,
    Refused,
    WebhookRoute,
    described,
)
from service.channels.sendgrid import inbound, mime
from service.channels.sendgrid.admission import SMALL_BUDGET_BYTES, MailBudget, small_share
from service.channels.sendgrid.extraction import Extractor
from service.conversation import shape_reply
from service.request_body import BodyTooLarge, declared_length, stream_body
from service.settings import Settings
from service.types import Channel, MediaItem, Outbound, SendResult

if TYPE_CHECKING:
    from service.channels.sendgrid.rest import SendGridRest

log = logging.getLogger(__name__)

_AUTHENTICATE = {"WWW-Authenticate": 'Basic realm="parley inbound parse"'}


class SendGridEmail:
    """The email channel. Sending goes through `rest`, imported only when an API key is
    configured (the SDK is a large part of an idle process otherwise)."""

    channel = Channel.EMAIL
    display_name = "Email"
    max_chars: int | None = None
    style = (
        "This conversation is over email: answer as a short, plain-text email body, "
        "without a subject line or signature."
    )
    inbound_path = "/webhooks/sendgrid/inbound"

    def __init__(self, settings: Settings, extractor: Extractor | None = None) -> None:
        self._settings = settings
        self.extractor = extractor or Extractor()  # its processes start on the first mail
        self.budget = MailBudget()  # big mails read at once (`admission`)
        self.small_budget = ByteBudget(SMALL_BUDGET_BYTES)  # and the others
        self._rest: SendGridRest | None = None
        if settings.sendgrid_api_key:
            from service.channels.sendgrid.rest import SendGridRest

            self._rest = SendGridRest(
                settings.sendgrid_api_key,
                settings.sendgrid_api_base_url,
                settings.provider_timeout_s,
            )

    # ------------------------------------------------------------ inbound

    def routes(self) -> Sequence[WebhookRoute]:
        return (WebhookRoute(self.inbound_path, self._receive),)

    async def _receive(self, request: Request, intake: Intake) -> Response:
        """Inbound Parse. Never a redirect, and 2xx only once stored: SendGrid retries 5xx."""
        self._authenticate(request)
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise Refused(400, "expected multipart/form-data")
        limit, declared = self._settings.max_email_bytes, declared_length(request)
        big = self.budget.share(declared, limit)
        budget, share = (self.budget, big) if big else (self.small_budget, small_share(declared))
        try:
            form = inbound.FormReader(content_type)
            async with budget.held(share):
                async for chunk in stream_body(request, limit):
                    form.feed(chunk)
                await self._receive_mail(intake, form.fields())
        except BodyTooLarge:
            raise Refused(413, "email over MAX_EMAIL_BYTES") from None
        except inbound.InvalidInbound as exc:
            raise Refused(400, str(exc)) from exc
        return Response("ok\n", media_type="text/plain")

    def _authenticate(self, request: Request) -> None:
        user = self._settings.sendgrid_inbound_user
        password = self._settings.sendgrid_inbound_password
        if not user or not password:
            if self._settings.parley_dev:
                return
            raise Refused(
                401,
                "SENDGRID_INBOUND_USER and SENDGRID_INBOUND_PASSWORD are not set: refusing traffic",
                _AUTHENTICATE,
            )
        if not inbound.credentials_match(request.headers.get("authorization"), user, password):
            raise Refused(401, "bad or missing credentials", _AUTHENTICATE)

    async def _receive_mail(self, intake: Intake, fields: dict[str, list[inbound.Part]]) -> None:
        """Header-level read, then the dedupe check, then body extraction, then the commit. A
        redelivery of a stored mail stops at the second step: a retried hostile mail costs no
        extraction. Raises `inbound.InvalidInbound` for a post that is not a usable mail."""
        # The capped header parse is linear, pure Python: a thread keeps it off the loop.
        envelope = await asyncio.to_thread(inbound.envelope_of, fields)
        if await intake.is_stored(envelope.provider_message_id):
            return
        own_replies = await intake.recent_replies(envelope.remote_address, envelope.local_address)
        extracted = await self.extractor.extract(
            dataclasses.replace(
                envelope.content, subject=envelope.subject, own_replies=tuple(own_replies)
            )
        )
        if extracted.problem:
            log.warning(
                "email %s: %s; using its truncated, unstripped text",
                envelope.provider_message_id[:80],
                extracted.problem,
            )
        await intake.record(envelope.inbound(extracted))

    def normalise_address(self, text: str) -> str | None:
        """An email address, bare and lower-cased; not for text without `@`."""
        if "@" not in text:
            return None
        bare = inbound.bare_address(text)
        local, _, domain = bare.rpartition("@")
        if not local or "." not in domain or " " in bare:
            raise BadAddress(f"not an email address: {text.strip()!r}")
        return bare

    # ------------------------------------------------------------ outbound

    @property
    def can_send(self) -> bool:
        return self._rest is not None

    def split(self, text: str) -> list[str]:
        return shape_reply(self.max_chars, text)

    def reply_envelope(
        self, subject: str | None, headers: dict[str, str], local_address: str
    ) -> tuple[str | None, dict[str, str]]:
        return mime.reply_subject(subject), mime.reply_headers(headers, local_address)

    async def send(self, outbound: Outbound) -> SendResult:
        assert self._rest is not None, "send() without credentials"
        return await self._rest.send(outbound)

    async def find_sent(self, outbound: Outbound, since: dt.datetime) -> list[str]:
        """SendGrid offers no cheap look-up; a resend carries the same Message-ID, which mail
        clients use to drop the duplicate."""
        raise LookupUnsupported

    async def fetch_attachments(
        self, media: Sequence[MediaItem], want_content: Callable[[MediaItem], bool]
    ) -> list[Attachment]:
        """Mail attachments are recorded in the message's metadata, never fetched."""
        return described(media)

    async def close(self) -> None:
        await self.extractor.close()
