"""SMS over Twilio: the plugin. The webhook side is `webhook`, sending is `rest`."""

from __future__ import annotations

from service.channels.twilio.base import TwilioChannel
from service.channels.twilio.webhook import normalise_phone
from service.types import Channel

SMS_MAX_CHARS = 1600  # Twilio's limit for one message body (it splits into segments itself)


class TwilioSms(TwilioChannel):
    channel = Channel.SMS
    display_name = "SMS"
    max_chars = SMS_MAX_CHARS
    style = "This conversation is over SMS: answer briefly, in plain text, no Markdown."
    message_path = "/webhooks/twilio/sms"
    status_path = "/webhooks/twilio/status"

    def normalise_address(self, text: str) -> str | None:
        """A phone number in international form; not for text with `@` (an email address)
        or a `scheme:` prefix (another Twilio channel's address, `whatsapp:+1…`)."""
        text = text.strip()
        if "@" in text or ":" in text:
            return None
        return normalise_phone(text)
