"""Provider-shaped requests, for the tests and for the CLI's `parley sms` / `parley email`:
what Twilio and SendGrid would post, built and signed the way they do. Nothing here is on a
request path of the service itself."""

from __future__ import annotations

import datetime as dt
import json
import mimetypes
from collections.abc import Mapping, Sequence
from email.utils import format_datetime
from urllib.parse import urlsplit

from twilio.request_validator import RequestValidator

# ---------------------------------------------------------------- Twilio


def inbound_form(
    body: str, from_: str, to: str, message_sid: str, account_sid: str
) -> dict[str, str]:
    """An inbound-SMS webhook form with every field Twilio sends for a plain SMS."""
    return {
        "ToCountry": "US",
        "ToState": "",
        "SmsMessageSid": message_sid,
        "NumMedia": "0",
        "ToCity": "",
        "FromZip": "",
        "SmsSid": message_sid,
        "FromState": "",
        "SmsStatus": "received",
        "FromCity": "",
        "Body": body,
        "FromCountry": "US",
        "To": to,
        "ToZip": "",
        "NumSegments": str(max(1, (len(body) + 152) // 153)),
        "ReferralNumMedia": "0",
        "MessageSid": message_sid,
        "AccountSid": account_sid,
        "From": from_,
        "ApiVersion": "2010-04-01",
    }


def with_media(form: Mapping[str, str], urls: Sequence[str]) -> dict[str, str]:
    """`form` as an MMS: `NumMedia`, `MediaUrl{i}` and `MediaContentType{i}` (guessed from
    each URL's name), an `MM` message sid as Twilio gives an inbound MMS."""
    if not urls:
        return dict(form)
    sid = "MM" + form["MessageSid"][2:]
    media: dict[str, str] = {}
    for index, url in enumerate(urls[:10]):
        content_type = mimetypes.guess_type(urlsplit(url).path)[0] or "application/octet-stream"
        media |= {f"MediaContentType{index}": content_type, f"MediaUrl{index}": url}
    sids = {"MessageSid": sid, "SmsSid": sid, "SmsMessageSid": sid}
    return {**media, **form, **sids, "NumMedia": str(len(media) // 2)}


def whatsapp_form(
    body: str, from_: str, to: str, message_sid: str, account_sid: str, profile_name: str
) -> dict[str, str]:
    """An inbound WhatsApp webhook form as Twilio sends it: `whatsapp:`-prefixed addresses,
    `ProfileName`, `WaId` (the sender's number, digits only), no geographic fields."""
    return {
        "SmsMessageSid": message_sid,
        "NumMedia": "0",
        "ProfileName": profile_name,
        "MessageType": "text",
        "SmsSid": message_sid,
        "WaId": from_.lstrip("+"),
        "SmsStatus": "received",
        "Body": body,
        "To": f"whatsapp:{to}",
        "NumSegments": "1",
        "ReferralNumMedia": "0",
        "MessageSid": message_sid,
        "AccountSid": account_sid,
        "From": f"whatsapp:{from_}",
        "ApiVersion": "2010-04-01",
    }


def sign(token: str, url: str, form: Mapping[str, str]) -> str:
    """The `X-Twilio-Signature` Twilio would send for this form posted to `url`."""
    return str(RequestValidator(token).compute_signature(url, dict(form)))


# ---------------------------------------------------------------- SendGrid


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
