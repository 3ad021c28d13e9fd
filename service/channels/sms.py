"""Twilio SMS: webhook signatures, the inbound form, status callbacks, and sending.

Everything Twilio-specific lives here; the rest of Parley sees `Inbound`, `Outbound`,
`SendResult`, `SendError` and `Delivery`.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import phonenumbers
from twilio.request_validator import RequestValidator, get_signature_algorithm

from service.conversation import classify_sms

if TYPE_CHECKING:
    from service.channels.twilio_rest import TwilioRest

from service.types import (
    Channel,
    Delivery,
    Inbound,
    Outbound,
    SendResult,
)

log = logging.getLogger(__name__)

MAX_WEBHOOK_BYTES = 64 * 1024
REQUIRED_FIELDS = ("MessageSid", "From", "To", "Body")
UNSUBSCRIBED_RECIPIENT = 21610
CLOCK_SKEW = dt.timedelta(minutes=2)  # between our clock and Twilio's
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
# Twilio's message ids, exactly. The signature concatenates keys and values with no separator,
# so a captured request re-cut at a key/value boundary (`MessageSid=SM…NumMedia0`) still
# validates: only the id's exact shape tells the forgery from Twilio's request.
MESSAGE_SID = re.compile(r"(SM|MM)[0-9a-f]{32}")
SID_FIELDS = ("MessageSid", "SmsSid")

# Twilio's MessageStatus values, mapped onto Parley's forward-only delivery states.
TWILIO_STATUS = {
    "accepted": Delivery.QUEUED,
    "scheduled": Delivery.QUEUED,
    "queued": Delivery.QUEUED,
    "sending": Delivery.QUEUED,
    "sent": Delivery.SENT,
    "delivered": Delivery.DELIVERED,
    "read": Delivery.DELIVERED,
    "undelivered": Delivery.UNDELIVERED,
    "failed": Delivery.FAILED,
    "canceled": Delivery.FAILED,
}


class InvalidWebhook(ValueError):
    """A signed request that is not a usable Twilio message."""


# ---------------------------------------------------------------- inbound


class _SignedParams(dict[str, list[str]]):
    """Form fields as the validator reads them (`getall`), each key's values looked up in O(1):
    a multidict's `getlist` scans every field for every key."""

    def getall(self, key: str) -> list[str]:
        return self[key]


def signature_is_valid(
    tokens: Sequence[str],
    url: str,
    form: Sequence[tuple[str, str]],
    signature: str | None,
    signature_settings: str | None = None,
) -> bool:
    """Twilio's own validator, against each configured token (two during rotation)."""
    if not signature or not tokens:
        return False
    params = _SignedParams()
    for key, value in form:
        params.setdefault(key, []).append(value)
    algorithm = get_signature_algorithm(signature_settings)
    return any(RequestValidator(t).validate(url, params, signature, algorithm) for t in tokens)


@functools.lru_cache(maxsize=8192)  # the same few numbers text again and again
def to_e164(number: str) -> str:
    """Twilio sends E.164 already; normalise anyway so one person is one conversation."""
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return number.strip()  # short codes, alphanumeric senders, channel prefixes
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def check_sids(form: Mapping[str, Any]) -> None:
    """`MessageSid` and `SmsSid`, where present, must be Twilio's `SM…`/`MM…` + 32 hex digits."""
    for name in SID_FIELDS:
        if name in form and not MESSAGE_SID.fullmatch(form[name]):
            raise InvalidWebhook(f"{name} is not a Twilio message sid (SM or MM + 32 hex digits)")


def parse_inbound(form: Mapping[str, Any]) -> Inbound:
    missing = [name for name in REQUIRED_FIELDS if name not in form]
    if missing:
        raise InvalidWebhook(f"missing field(s): {', '.join(missing)}")
    check_sids(form)
    if not form["From"].strip() or not form["To"].strip():
        raise InvalidWebhook("From and To must not be empty")
    media = [
        form[f"MediaUrl{i}"] for i in range(_int(form.get("NumMedia"))) if f"MediaUrl{i}" in form
    ]
    return Inbound(
        channel=Channel.SMS,
        provider_message_id=form["MessageSid"],
        remote_address=to_e164(form["From"]),
        local_address=to_e164(form["To"]),
        body=form["Body"],
        intent=classify_sms(form["Body"], form.get("OptOutType")),
        meta={"media": media} if media else {},
    )


def _int(value: str | None) -> int:
    try:
        return max(0, min(int(value or 0), 10))
    except ValueError:
        return 0


@dataclass(frozen=True)
class StatusUpdate:
    provider_message_id: str
    status: Delivery
    error: str | None


def parse_status(form: Mapping[str, Any]) -> StatusUpdate:
    check_sids(form)
    sid = form.get("MessageSid") or form.get("SmsSid") or ""
    raw = (form.get("MessageStatus") or form.get("SmsStatus") or "").strip().lower()
    if not sid or raw not in TWILIO_STATUS:
        raise InvalidWebhook("a status callback needs MessageSid and a known MessageStatus")
    return StatusUpdate(sid, TWILIO_STATUS[raw], _error_of(form))


def _error_of(form: Mapping[str, Any]) -> str | None:
    """`Twilio error 30003`, with Twilio's `ErrorMessage` when it sends one (cleaned on store)."""
    code = (form.get("ErrorCode") or "").strip()
    if not code or code == "0":
        return None
    message = (form.get("ErrorMessage") or "").strip()
    return f"Twilio error {code}" + (f": {message}" if message else "")


# ---------------------------------------------------------------- outbound


class TwilioSms:
    """The SMS channel. Sending goes through `twilio_rest`, imported only when credentials are
    configured: the REST client and aiohttp are a large part of an idle process otherwise."""

    channel = Channel.SMS

    def __init__(
        self,
        account_sid: str | None,
        auth_token: str | None,
        api_base_url: str,
        status_callback_url: str | None,
        timeout_s: float = 15.0,
    ) -> None:
        self._rest: TwilioRest | None = None
        if account_sid and auth_token:
            from service.channels.twilio_rest import TwilioRest

            self._rest = TwilioRest(
                account_sid, auth_token, api_base_url, status_callback_url, timeout_s
            )

    @property
    def can_send(self) -> bool:
        return self._rest is not None

    async def send(self, outbound: Outbound) -> SendResult:
        assert self._rest is not None, "send() without credentials"
        return await self._rest.send(outbound)

    async def find_sent(self, outbound: Outbound, since: dt.datetime) -> list[str]:
        assert self._rest is not None, "find_sent() without credentials"
        return await self._rest.find_sent(outbound, since)

    def reply_envelope(
        self, subject: str | None, headers: dict[str, str], local_address: str
    ) -> tuple[str | None, dict[str, str]]:
        return None, {}

    async def close(self) -> None:
        if self._rest is not None:
            await self._rest.close()
