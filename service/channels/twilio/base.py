"""What every channel over Twilio shares: its two webhooks (messages and status callbacks,
read by `webhook`) and sending through `rest`. A Twilio channel (SMS, WhatsApp) subclasses
`TwilioChannel` with its enum value, paths, name, limits and address rule."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

from starlette.requests import Request
from starlette.responses import Response

from service.channels.base import Attachment, Intake, InvalidWebhook, Refused, WebhookRoute
from service.channels.twilio import webhook
from service.channels.twilio.media import TwilioMedia
from service.conversation import shape_reply
from service.settings import Settings
from service.types import Channel, Inbound, MediaItem, Outbound, SendResult

if TYPE_CHECKING:
    from service.channels.twilio.rest import TwilioRest


class TwilioChannel:
    """A Twilio channel. Sending goes through `rest`, imported only when credentials are
    configured: the REST client and aiohttp are a large part of an idle process otherwise.

    Twilio posts every channel's messages and status callbacks to the same webhooks, telling
    them apart only by the prefix on `From`/`To` (`whatsapp:+1…`). Each subclass names its
    `address_prefix`; whichever route a form arrives on, the class owning its prefix reads it."""

    channel: Channel
    display_name: str
    max_chars: int | None
    style: str
    message_path: str
    status_path: str
    address_prefix: ClassVar[str] = ""  # "" is a plain number (SMS)
    _by_prefix: ClassVar[dict[str, type[TwilioChannel]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        TwilioChannel._by_prefix[cls.address_prefix] = cls

    @staticmethod
    def owner_of(form: Mapping[str, str]) -> type[TwilioChannel]:
        """The Twilio channel a form belongs to, by its addresses' prefix."""
        prefix = webhook.address_prefix(form)
        owner = TwilioChannel._by_prefix.get(prefix)
        if owner is None:
            raise InvalidWebhook(f"no Twilio channel for addresses prefixed {prefix!r}")
        return owner

    def __init__(self, settings: Settings, media: TwilioMedia | None = None) -> None:
        self._settings = settings
        # Shared by the registry between the Twilio channels: one media HTTP client a process.
        self._media = media if media is not None else TwilioMedia(settings)
        self._rest: TwilioRest | None = None
        self._credentials = bool(settings.twilio_account_sid and settings.twilio_auth_tokens)
        if self._credentials:
            import service.channels.twilio.rest  # noqa: F401  (loaded at start, as a sender)

    def _client(self) -> TwilioRest:
        """The REST client, made on first use: its HTTP session belongs to the running loop,
        and a registry built outside one (the app factory, the CLI) opens nothing."""
        assert self._credentials, "send() without credentials"
        if self._rest is None:
            from service.channels.twilio.rest import TwilioRest

            assert self._settings.twilio_account_sid is not None
            self._rest = TwilioRest(
                self._settings.twilio_account_sid,
                self._settings.twilio_auth_tokens[0],
                self._settings.twilio_api_base_url,
                self.status_callback_url,
                self._settings.provider_timeout_s,
            )
        return self._rest

    def status_callback_url(self, outbound: Outbound | None = None) -> str | None:
        """Where Twilio posts a send's delivery reports: under `PUBLIC_BASE_URL`, else under
        the URL the conversation's last signed webhook came to (`Inbound.reached_at`); none
        when neither is known."""
        base = self._settings.public_base_url or (outbound.reached_at if outbound else None)
        return f"{base}{self.status_path}" if base else None

    # ------------------------------------------------------------ inbound

    def routes(self) -> Sequence[WebhookRoute]:
        return (
            WebhookRoute(self.message_path, self._receive),
            WebhookRoute(self.status_path, self._status, kind="status"),
        )

    async def _receive(self, request: Request, intake: Intake) -> Response:
        form = await webhook.read_form(request, self._settings)
        try:
            inbound = self.owner_of(form).parse_inbound(form)
        except InvalidWebhook as exc:
            raise Refused(400, str(exc)) from exc
        if not self._settings.public_base_url and self._settings.twilio_auth_tokens:
            # Its signature covered this URL, host included: the one Twilio reaches us at.
            inbound = replace(
                inbound, reached_at=webhook.base_url_of(request, self._settings, form)
            )
        await intake.record(inbound)
        return Response(webhook.EMPTY_TWIML, media_type="text/xml")

    async def _status(self, request: Request, intake: Intake) -> Response:
        form = await webhook.read_form(request, self._settings)
        try:
            update = webhook.parse_status(form, self.owner_of(form).channel)
        except InvalidWebhook as exc:
            raise Refused(400, str(exc)) from exc
        await intake.update_delivery(update)
        return Response(status_code=204)

    @classmethod
    def parse_inbound(cls, form: Mapping[str, str]) -> Inbound:
        """An inbound form of this channel as an `Inbound`."""
        return webhook.parse_inbound(form, cls.channel, cls.inbound_address)

    @classmethod
    def inbound_address(cls, raw: str) -> str:
        """`From`/`To` of an inbound form as stored, without the channel prefix: one person
        is one conversation."""
        return webhook.to_e164(raw.strip()[len(cls.address_prefix) :])

    def normalise_address(self, text: str) -> str | None:
        raise NotImplementedError

    # ------------------------------------------------------------ outbound

    @property
    def can_send(self) -> bool:
        return self._credentials

    def split(self, text: str) -> list[str]:
        return shape_reply(self.max_chars, text)

    def reply_envelope(
        self, subject: str | None, headers: dict[str, str], local_address: str
    ) -> tuple[str | None, dict[str, str]]:
        return None, {}

    async def send(self, outbound: Outbound) -> SendResult:
        return await self._client().send(outbound)

    async def find_sent(self, outbound: Outbound, since: dt.datetime) -> list[str]:
        return await self._client().find_sent(outbound, since)

    async def fetch_attachments(
        self, media: Sequence[MediaItem], want_content: Callable[[MediaItem], bool]
    ) -> list[Attachment]:
        return await self._media.fetch(media, want_content)

    async def close(self) -> None:
        await self._media.close()
        rest, self._rest = self._rest, None
        if rest is not None:
            await rest.close()
