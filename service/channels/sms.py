"""Twilio SMS: webhook signatures, the inbound form, status callbacks, and sending.

Everything Twilio-specific lives here; the rest of Parley sees `Inbound`, `Outbound`,
`SendResult`, `SendError` and `Delivery`.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import phonenumbers
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response as TwilioResponse
from twilio.request_validator import RequestValidator, get_signature_algorithm
from twilio.rest import Client

from service.conversation import classify_sms
from service.types import (
    Channel,
    Delivery,
    Inbound,
    Outbound,
    RecipientOptedOut,
    SendError,
    SendResult,
)

log = logging.getLogger(__name__)

MAX_WEBHOOK_BYTES = 64 * 1024
REQUIRED_FIELDS = ("MessageSid", "From", "To", "Body")
UNSUBSCRIBED_RECIPIENT = 21610
CLOCK_SKEW = dt.timedelta(minutes=2)  # between our clock and Twilio's
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'

# Twilio's MessageStatus values, mapped onto Parley's forward-only delivery states.
_STATUS = {
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


def parse_inbound(form: Mapping[str, Any]) -> Inbound:
    missing = [name for name in REQUIRED_FIELDS if name not in form]
    if missing:
        raise InvalidWebhook(f"missing field(s): {', '.join(missing)}")
    if not form["MessageSid"].strip() or not form["From"].strip() or not form["To"].strip():
        raise InvalidWebhook("MessageSid, From and To must not be empty")
    media = [
        form[f"MediaUrl{i}"] for i in range(_int(form.get("NumMedia"))) if f"MediaUrl{i}" in form
    ]
    return Inbound(
        channel=Channel.SMS,
        provider_message_id=form["MessageSid"].strip(),
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
    sid = (form.get("MessageSid") or form.get("SmsSid") or "").strip()
    raw = (form.get("MessageStatus") or form.get("SmsStatus") or "").strip().lower()
    if not sid or raw not in _STATUS:
        raise InvalidWebhook("a status callback needs MessageSid and a known MessageStatus")
    code = form.get("ErrorCode")
    error = f"Twilio error {code}" if code and code != "0" else None
    return StatusUpdate(sid, _STATUS[raw], error)


# ---------------------------------------------------------------- outbound

# The SDK's exception carries no headers; the HTTP client notes Retry-After for the task that
# made the request (a context variable, so concurrent sends never see each other's).
_retry_after: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "twilio_retry_after", default=None
)


class _RetryAfterHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]
    async def request(self, *args: Any, **kwargs: Any) -> TwilioResponse:
        response = await super().request(*args, **kwargs)
        _retry_after.set(
            _seconds(response.headers.get("Retry-After")) if response.headers else None
        )
        return response


def _seconds(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class TwilioSms:
    """Sends through the twilio SDK's asyncio client (aiohttp), never blocking the loop."""

    channel = Channel.SMS

    def __init__(
        self,
        account_sid: str | None,
        auth_token: str | None,
        api_base_url: str,
        status_callback_url: str | None,
        timeout_s: float = 15.0,
    ) -> None:
        self._status_callback = status_callback_url
        self._timeout_s = timeout_s
        self._client: Client | None = None
        if account_sid and auth_token:
            http = _RetryAfterHttpClient()
            self._client = Client(account_sid, auth_token, http_client=http)
            self._client.api.base_url = api_base_url.rstrip("/")

    @property
    def can_send(self) -> bool:
        return self._client is not None

    async def send(self, outbound: Outbound) -> SendResult:
        assert self._client is not None, "send() without credentials"
        params: dict[str, Any] = {
            "to": outbound.to,
            "from_": outbound.from_,
            "body": outbound.body,
        }
        if self._status_callback:
            params["status_callback"] = self._status_callback
        try:
            async with asyncio.timeout(self._timeout_s):
                message = await self._client.messages.create_async(**params)
        except TwilioRestException as exc:
            raise _send_error(exc) from exc
        except TimeoutError as exc:
            raise SendError(
                "Twilio did not answer in time", retryable=True, ambiguous=True
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise SendError(f"Twilio unreachable: {exc}", retryable=True) from exc
        except aiohttp.ClientError as exc:
            raise SendError(
                f"connection to Twilio lost: {exc}", retryable=True, ambiguous=True
            ) from exc
        return SendResult(message.sid, _STATUS.get(str(message.status), Delivery.QUEUED))

    async def find_sent(self, outbound: Outbound, since: dt.datetime) -> list[str]:
        """Twilio's message list: same To, From and body, created since `since`, oldest first.

        `DateSent` is unset while a message is queued, so filter on creation time here."""
        assert self._client is not None
        cutoff = since - CLOCK_SKEW
        async with asyncio.timeout(self._timeout_s):
            recent = await self._client.messages.list_async(
                to=outbound.to, from_=outbound.from_, limit=50
            )
        return [
            str(message.sid)
            for message in reversed(recent)
            if message.body == outbound.body
            and (message.date_created is None or message.date_created >= cutoff)
        ]

    def reply_envelope(
        self, subject: str | None, headers: dict[str, str], local_address: str
    ) -> tuple[str | None, dict[str, str]]:
        return None, {}

    async def close(self) -> None:
        if self._client is not None and isinstance(self._client.http_client, AsyncTwilioHttpClient):
            await self._client.http_client.close()


def _send_error(exc: TwilioRestException) -> SendError:
    status = int(exc.status or 0)
    code = int(exc.code) if exc.code else None
    text = f"Twilio {status}" + (f" error {code}" if code else "") + f": {exc.msg}"
    if code == UNSUBSCRIBED_RECIPIENT:
        return RecipientOptedOut(text, code=code)
    if status == 429 or status >= 500:
        return SendError(text, retryable=True, retry_after_s=_retry_after.get(), code=code)
    return SendError(text, retryable=False, code=code)


# ---------------------------------------------------------------- simulating Twilio


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


def sign(token: str, url: str, form: Mapping[str, str]) -> str:
    """The `X-Twilio-Signature` Twilio would send for this form posted to `url`."""
    return str(RequestValidator(token).compute_signature(url, dict(form)))
