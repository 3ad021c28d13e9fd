"""WhatsApp over Twilio: the plugin. Twilio delivers WhatsApp messages like SMS, to the same
webhooks, with `whatsapp:`-prefixed `From`/`To` plus `ProfileName`; what differs is the prefix
on our sends and WhatsApp's 24-hour window for free-form messages."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping, Sequence
from dataclasses import replace

from service.channels.base import WebhookRoute
from service.channels.twilio.base import TwilioChannel
from service.channels.twilio.media import TwilioMedia
from service.channels.twilio.sms import SMS_MAX_CHARS
from service.channels.twilio.webhook import normalise_phone
from service.settings import Settings
from service.types import Channel, Delivery, Inbound, Outbound, SendError, SendResult

PREFIX = "whatsapp:"
WINDOW = dt.timedelta(hours=24)  # free-form messages only this long after the person's last
OUTSIDE_WINDOW = "outside_whatsapp_window"  # the reason a reply outside it fails with
OUTSIDE_WINDOW_ERROR = 63016  # Twilio: "outside the allowed window"
TEMPLATE_VARIABLE_CHARS = 1000  # how much of the reply fills the template's {{1}}
# What a reply's later parts say outside the window (true whether its first part went out as
# the template or, before the window closed, free-form).
CARRIED_BY_TEMPLATE = f"{OUTSIDE_WINDOW}: only a reply's first part goes out, as the template"
PROFILE_NAME_CHARS = 255


class Send(enum.Enum):
    """How a WhatsApp message may go out at a given moment."""

    FREE_FORM = "free_form"
    TEMPLATE = "template"
    REFUSE = "refuse"


def how_to_send(
    last_inbound_at: dt.datetime | None,
    now: dt.datetime,
    template_sid: str | None,
    closed_at: dt.datetime | None = None,
) -> Send:
    """Free-form within 24 hours of the person's last message, unless Twilio said the window
    was closed (63016, at `closed_at`) after that message; otherwise the approved template
    if there is one, else nothing (Twilio would refuse with 63016)."""
    refused_since = closed_at is not None and (
        last_inbound_at is None or closed_at >= last_inbound_at
    )
    if last_inbound_at is not None and now - last_inbound_at <= WINDOW and not refused_since:
        return Send.FREE_FORM
    return Send.TEMPLATE if template_sid else Send.REFUSE


def template_variables(body: str) -> dict[str, str]:
    return {"1": body[:TEMPLATE_VARIABLE_CHARS]}


class TwilioWhatsApp(TwilioChannel):
    channel = Channel.WHATSAPP
    display_name = "WhatsApp"
    max_chars = SMS_MAX_CHARS  # Twilio's body limit, as for SMS
    style = "This conversation is over WhatsApp: answer briefly, in plain text."
    message_path = "/webhooks/twilio/whatsapp"
    status_path = "/webhooks/twilio/status"  # the SMS plugin's route, which serves both
    address_prefix = PREFIX
    CLOSED_WINDOWS_KEPT = 10_000  # conversations whose 63016 this process remembers

    def __init__(self, settings: Settings, media: TwilioMedia | None = None) -> None:
        super().__init__(settings, media)
        # (to, from) -> when Twilio answered 63016: a retry of the job (or the next reply) goes
        # as the template until the person writes again. Per process: a retry taken over by
        # another process tries free-form once more, gets 63016 again, and sends the template.
        self._closed_at: dict[tuple[str, str], dt.datetime] = {}

    # ------------------------------------------------------------ inbound

    def routes(self) -> Sequence[WebhookRoute]:
        """Only the message webhook: status callbacks arrive on the SMS plugin's route, which
        hands them to this channel by their prefix."""
        return (WebhookRoute(self.message_path, self._receive),)

    @classmethod
    def parse_inbound(cls, form: Mapping[str, str]) -> Inbound:
        """As SMS, plus `ProfileName` as the display name of the conversation."""
        inbound = super().parse_inbound(form)
        name = " ".join((form.get("ProfileName") or "").split())[:PROFILE_NAME_CHARS]
        return replace(inbound, display_name=name or None)

    def normalise_address(self, text: str) -> str | None:
        """`whatsapp:+1…` as stored (E.164, no prefix); None for anything else."""
        text = text.strip()
        if not text.lower().startswith(PREFIX):
            return None
        return normalise_phone(text[len(PREFIX) :])

    # ------------------------------------------------------------ outbound

    async def send(self, outbound: Outbound) -> SendResult:
        """Free-form inside the window; outside it (by our clock, or by Twilio's 63016) the
        template at once, or a failure without a(nother) call: a 63016 is never retried as
        free-form."""
        addressed = _prefixed(outbound)
        if self._how_to_send(outbound) is not Send.FREE_FORM:
            return await self._outside_window(addressed)
        try:
            return await self._client().send(addressed)
        except SendError as exc:
            if exc.code != OUTSIDE_WINDOW_ERROR:
                raise
            self._remember_closed(outbound)
            return await self._outside_window(addressed)

    def _remember_closed(self, outbound: Outbound) -> None:
        if len(self._closed_at) >= self.CLOSED_WINDOWS_KEPT:
            self._closed_at.pop(next(iter(self._closed_at)))  # the oldest
        self._closed_at[(outbound.to, outbound.from_)] = dt.datetime.now(dt.UTC)

    async def _outside_window(self, outbound: Outbound) -> SendResult:
        """One template a reply: its first part goes as the template, whose variable is the
        part's first 1,000 characters (the reply's: parts are cut at the last space before
        1,600, so only a reply whose first space comes that late differs); a later part is
        not sent, since the template stands for the whole reply. Without a template, fails."""
        from service.channels.twilio.rest import Template

        template_sid = self._settings.whatsapp_template_sid
        if not template_sid:
            raise SendError(OUTSIDE_WINDOW, retryable=False, code=OUTSIDE_WINDOW_ERROR)
        if outbound.part > 1:
            return SendResult(None, Delivery.NOT_SENT, note=CARRIED_BY_TEMPLATE)
        template = Template(template_sid, template_variables(outbound.body))
        return await self._client().send(outbound, template)

    async def find_sent(self, outbound: Outbound, since: dt.datetime) -> list[str]:
        """As SMS, with the prefixed addresses; a template send is listed with Twilio's own
        text, so outside the window any message to the person since `since` matches."""
        return await self._client().find_sent(
            _prefixed(outbound), since, any_body=self._how_to_send(outbound) is not Send.FREE_FORM
        )

    def _how_to_send(self, outbound: Outbound) -> Send:
        return how_to_send(
            outbound.last_inbound_at,
            dt.datetime.now(dt.UTC),
            self._settings.whatsapp_template_sid,
            self._closed_at.get((outbound.to, outbound.from_)),
        )


def _prefixed(outbound: Outbound) -> Outbound:
    return replace(outbound, to=PREFIX + outbound.to, from_=PREFIX + outbound.from_)
