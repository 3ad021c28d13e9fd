"""Twilio's webhook side, for every Twilio channel: the signed form (read within limits,
signature, AccountSid), the message sids, the inbound form as an `Inbound`, and status
callbacks. A channel over Twilio (SMS, WhatsApp) differs only in its enum value and its
address rules; everything here takes the channel it reads for.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

import phonenumbers
from starlette.requests import Request
from twilio.request_validator import (
    HMAC_SHA1,
    HMAC_SHA256,
    RequestValidator,
    compare,
    get_signature_algorithm,
)

from service.channels.base import BadAddress, InvalidWebhook, Refused, StatusUpdate
from service.conversation import classify_sms
from service.request_body import BodyTooLarge, read_body
from service.settings import Settings
from service.types import Channel, Delivery, Inbound, MediaItem

log = logging.getLogger(__name__)
# What `X-Twilio-Webhooks-Signature-Settings` may name. Anything else is refused here, before
# twilio's validator, which logs the header's value (an attacker's, of any length) as a second
# line beside the refusal's.
SIGNATURE_ALGORITHMS = frozenset({HMAC_SHA1, HMAC_SHA256})
MAX_BASE_URL_CHARS = 255  # `conversation.public_base_url`

MAX_WEBHOOK_BYTES = 64 * 1024
REQUIRED_FIELDS = ("MessageSid", "From", "To", "Body")
UNSUBSCRIBED_RECIPIENT = 21610
CLOCK_SKEW = dt.timedelta(minutes=2)  # between our clock and Twilio's
FORM_TYPE = "application/x-www-form-urlencoded"
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
    "read": Delivery.READ,
    "undelivered": Delivery.UNDELIVERED,
    "failed": Delivery.FAILED,
    "canceled": Delivery.FAILED,
}


# ---------------------------------------------------------------- the signed form


def signed_url(request: Request, settings: Settings) -> str:
    """The URL Twilio signed: our public one behind proxies, else what this request says."""
    if not settings.public_base_url:
        return str(request.url)
    query = f"?{request.url.query}" if request.url.query else ""
    return f"{settings.public_base_url}{request.url.path}{query}"


def base_url_of(request: Request, settings: Settings, form: Mapping[str, str]) -> str:
    """The scheme and host a signed request came to, as Twilio's signature covered them. Its
    port only if the signature covered that port: Twilio's validator also accepts the URL
    with the port removed, so a captured request resent to `host:6666` validates, and would
    have sent the conversation's delivery reports to that port."""
    netloc = request.url.netloc
    if request.url.port is not None and not _signed_exactly(request, settings, form):
        netloc = netloc.rsplit(":", 1)[0]
    return f"{request.url.scheme}://{netloc}"[:MAX_BASE_URL_CHARS]


def _signed_exactly(request: Request, settings: Settings, form: Mapping[str, str]) -> bool:
    signature = request.headers.get("x-twilio-signature") or ""
    algorithm = get_signature_algorithm(request.headers.get("x-twilio-webhooks-signature-settings"))
    url = signed_url(request, settings)
    params = _SignedParams.of(form.items())
    return any(
        compare(RequestValidator(t).compute_signature(url, params, algorithm), signature)
        for t in settings.twilio_auth_tokens
    )


async def read_form(request: Request, settings: Settings) -> dict[str, str]:
    """The signed form of a Twilio request; `Refused` for anything else."""
    tokens = settings.twilio_auth_tokens
    if not tokens and not settings.parley_dev:
        raise Refused(403, "TWILIO_AUTH_TOKEN is not set: refusing unsigned traffic")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM_TYPE:
        raise Refused(400, f"expected {FORM_TYPE}")
    try:
        raw = await read_body(request, MAX_WEBHOOK_BYTES)
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True)
    except BodyTooLarge:
        raise Refused(413, "request body over 64 KiB") from None
    except UnicodeDecodeError:
        raise Refused(400, "body is not UTF-8") from None
    if tokens and not signature_is_valid(
        tokens,
        signed_url(request, settings),
        pairs,
        request.headers.get("x-twilio-signature"),
        request.headers.get("x-twilio-webhooks-signature-settings"),
    ):
        raise Refused(403, "bad or missing X-Twilio-Signature")
    form = dict(pairs)
    if settings.twilio_account_sid and form.get("AccountSid") != settings.twilio_account_sid:
        raise Refused(403, "AccountSid is not TWILIO_ACCOUNT_SID")
    return form


class _SignedParams(dict[str, list[str]]):
    """Form fields as the validator reads them (`getall`), each key's values looked up in O(1):
    a multidict's `getlist` scans every field for every key."""

    @classmethod
    def of(cls, form: Iterable[tuple[str, str]]) -> _SignedParams:
        params = cls()
        for key, value in form:
            params.setdefault(key, []).append(value)
        return params

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
    params = _SignedParams.of(form)
    algorithm = get_signature_algorithm(signature_settings)
    if algorithm.upper() not in SIGNATURE_ALGORITHMS:  # the validator would log it, whole
        return False
    return any(RequestValidator(t).validate(url, params, signature, algorithm) for t in tokens)


def normalise_phone(text: str) -> str:
    """A phone number typed by an operator (`parley forget`), as E.164; `BadAddress` unless it
    is a possible number in international form."""
    text = text.strip()
    try:
        parsed = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        raise BadAddress(
            f"not a phone number in international form (+15550001111): {text!r}"
        ) from None
    if not phonenumbers.is_possible_number(parsed):
        raise BadAddress(f"not a possible phone number: {text!r}")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


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


def parse_inbound(
    form: Mapping[str, Any], channel: Channel, address: Callable[[str], str] = to_e164
) -> Inbound:
    """The form as `channel`'s `Inbound`, `From` and `To` read by the channel's `address` rule
    (E.164 for SMS)."""
    missing = [name for name in REQUIRED_FIELDS if name not in form]
    if missing:
        raise InvalidWebhook(f"missing field(s): {', '.join(missing)}")
    check_sids(form)
    if not form["From"].strip() or not form["To"].strip():
        raise InvalidWebhook("From and To must not be empty")
    return Inbound(
        channel=channel,
        provider_message_id=form["MessageSid"],
        remote_address=address(form["From"]),
        local_address=address(form["To"]),
        body=form["Body"],
        intent=classify_sms(form["Body"], form.get("OptOutType")),
        media=media_of(form),
    )


def media_of(form: Mapping[str, Any]) -> tuple[MediaItem, ...]:
    """`NumMedia` (0-10) items of `MediaUrl{i}` and `MediaContentType{i}`, in Twilio's order;
    nothing is fetched here (the worker does, before the model call)."""
    return tuple(
        MediaItem(
            url=form[f"MediaUrl{i}"].strip(),
            content_type=(form.get(f"MediaContentType{i}") or "").strip().lower()
            or "application/octet-stream",
        )
        for i in range(_int(form.get("NumMedia")))
        if (form.get(f"MediaUrl{i}") or "").strip()
    )


def _int(value: str | None) -> int:
    try:
        return max(0, min(int(value or 0), 10))
    except ValueError:
        return 0


def parse_status(form: Mapping[str, Any], channel: Channel | None = None) -> StatusUpdate:
    check_sids(form)
    sid = form.get("MessageSid") or form.get("SmsSid") or ""
    raw = (form.get("MessageStatus") or form.get("SmsStatus") or "").strip().lower()
    if not sid or raw not in TWILIO_STATUS:
        raise InvalidWebhook("a status callback needs MessageSid and a known MessageStatus")
    return StatusUpdate(sid, TWILIO_STATUS[raw], _error_of(form), channel)


def address_prefix(form: Mapping[str, Any]) -> str:
    """The channel prefix `From` and `To` carry (`whatsapp:`), "" for plain numbers (SMS);
    `InvalidWebhook` if they differ: a message is on one channel."""
    prefixes = {_prefix_of(str(form.get(name) or "")) for name in ("From", "To")}
    if len(prefixes) != 1:
        raise InvalidWebhook("From and To carry different channel prefixes")
    return prefixes.pop()


def _prefix_of(address: str) -> str:
    scheme, colon, _ = address.strip().partition(":")
    return f"{scheme.lower()}:" if colon and scheme.isalpha() else ""


def _error_of(form: Mapping[str, Any]) -> str | None:
    """`Twilio error 30003`, with Twilio's `ErrorMessage` when it sends one (cleaned on store)."""
    code = (form.get("ErrorCode") or "").strip()
    if not code or code == "0":
        return None
    message = (form.get("ErrorMessage") or "").strip()
    return f"Twilio error {code}" + (f": {message}" if message else "")
