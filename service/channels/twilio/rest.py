"""Twilio's REST API through the twilio SDK's asyncio client (aiohttp): sending an SMS and
looking one up. Imported by `base.TwilioChannel` only when credentials are configured."""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response as TwilioResponse
from twilio.rest import Client

from service.channels.twilio.webhook import CLOCK_SKEW, TWILIO_STATUS, UNSUBSCRIBED_RECIPIENT
from service.retry import is_retryable_status, retry_after_seconds
from service.types import Delivery, Outbound, RecipientOptedOut, SendError, SendResult

# The SDK's exception carries no headers; the HTTP client notes Retry-After for the task that
# made the request (a context variable, so concurrent sends never see each other's).
_retry_after: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "twilio_retry_after", default=None
)


@dataclass(frozen=True)
class Template:
    """An approved template (WhatsApp outside its window): `ContentSid`, `ContentVariables`."""

    content_sid: str
    variables: dict[str, str]


_FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}


class _RetryAfterHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]
    async def request(self, *args: Any, **kwargs: Any) -> TwilioResponse:
        response = await super().request(*args, **kwargs)
        _retry_after.set(
            retry_after_seconds(response.headers.get("Retry-After")) if response.headers else None
        )
        return response


class TwilioRest:
    """Sends through the twilio SDK's asyncio client (aiohttp), never blocking the loop."""

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        api_base_url: str,
        status_callback_url: Callable[[Outbound], str | None] = lambda _outbound: None,
        timeout_s: float = 15.0,
    ) -> None:
        self._status_callback = status_callback_url  # a send's StatusCallback, if any
        self._timeout_s = timeout_s
        self._http = _RetryAfterHttpClient()
        self._client = Client(account_sid, auth_token, http_client=self._http)
        self._client.api.base_url = api_base_url.rstrip("/")
        # Sends go through the API version's own `create_async`, as the generated
        # `messages.create_async` does, without building a `MessageInstance` of ~30 parsed
        # fields (dates, prices) of which Parley reads two: ~0.1 ms of CPU a reply.
        self._api = self._client.api.v2010
        self._messages_uri = f"/Accounts/{account_sid}/Messages.json"

    async def send(self, outbound: Outbound, template: Template | None = None) -> SendResult:
        """Send `outbound`'s body, or instead the approved `template` (no body)."""
        data: dict[str, object] = {"To": outbound.to, "From": outbound.from_}
        if template is None:
            data["Body"] = outbound.body
        else:
            data["ContentSid"] = template.content_sid
            data["ContentVariables"] = json.dumps(template.variables)
        if callback := self._status_callback(outbound):
            data["StatusCallback"] = callback
        try:
            async with asyncio.timeout(self._timeout_s):
                # The headers a copy: the SDK adds its own to the dict it is given.
                message = await self._api.create_async(
                    method="POST", uri=self._messages_uri, data=data, headers=dict(_FORM_HEADERS)
                )
        except TwilioRestException as exc:
            raise _send_error(int(exc.status or 0), exc.code, exc.msg) from exc
        except TwilioServiceException as exc:  # an RFC 9457 problem body: same meaning
            raise _send_error(int(exc.status or 0), exc.code, exc.detail or exc.title) from exc
        except json.JSONDecodeError as exc:  # accepted, with a body that says nothing
            raise SendError(
                "Twilio accepted the message with an unreadable answer",
                retryable=True,
                ambiguous=True,
            ) from exc
        except TimeoutError as exc:
            raise SendError.no_answer("Twilio") from exc
        except aiohttp.ClientConnectorError as exc:
            raise SendError(f"Twilio unreachable: {exc}", retryable=True) from exc
        except aiohttp.ClientError as exc:
            raise SendError(
                f"connection to Twilio lost: {exc}", retryable=True, ambiguous=True
            ) from exc
        sid = message.get("sid") if isinstance(message, dict) else None
        if not sid:  # accepted, yet no id to look it up by: whether it went out is unknown
            raise SendError(
                "Twilio accepted a message without its sid", retryable=True, ambiguous=True
            )
        status = TWILIO_STATUS.get(str(message.get("status")), Delivery.QUEUED)
        return SendResult(str(sid), status)

    async def find_sent(
        self, outbound: Outbound, since: dt.datetime, any_body: bool = False
    ) -> list[str]:
        """Twilio's message list: same To, From and body (any body: a template, which Twilio
        lists as its own rendered text), created since `since`, oldest first.

        `DateSent` is unset while a message is queued, so filter on creation time here."""
        cutoff = since - CLOCK_SKEW
        async with asyncio.timeout(self._timeout_s):
            recent = await self._client.messages.list_async(
                to=outbound.to, from_=outbound.from_, limit=50
            )
        return [
            str(message.sid)
            for message in reversed(recent)
            if (any_body or message.body == outbound.body)
            and (message.date_created is None or message.date_created >= cutoff)
        ]

    async def close(self) -> None:
        await self._http.close()


def _send_error(status: int, raw_code: object, message: object) -> SendError:
    code = int(str(raw_code)) if str(raw_code or "").isdigit() else None
    text = f"Twilio {status}" + (f" error {code}" if code else "") + f": {message}"
    if code == UNSUBSCRIBED_RECIPIENT:
        return RecipientOptedOut(text, code=code)
    if is_retryable_status(status):
        return SendError(text, retryable=True, retry_after_s=_retry_after.get(), code=code)
    return SendError(text, retryable=False, code=code)
