"""Twilio's REST API through the twilio SDK's asyncio client (aiohttp): sending an SMS and
looking one up. Imported by `base.TwilioChannel` only when credentials are configured."""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from twilio.base.exceptions import TwilioRestException
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
        status_callback_url: str | None,
        timeout_s: float = 15.0,
    ) -> None:
        self._status_callback = status_callback_url
        self._timeout_s = timeout_s
        self._http = _RetryAfterHttpClient()
        self._client = Client(account_sid, auth_token, http_client=self._http)
        self._client.api.base_url = api_base_url.rstrip("/")

    async def send(self, outbound: Outbound, template: Template | None = None) -> SendResult:
        """Send `outbound`'s body, or instead the approved `template` (no body)."""
        params: dict[str, Any] = {"to": outbound.to, "from_": outbound.from_}
        if template is None:
            params["body"] = outbound.body
        else:
            params["content_sid"] = template.content_sid
            params["content_variables"] = json.dumps(template.variables)
        if self._status_callback:
            params["status_callback"] = self._status_callback
        try:
            async with asyncio.timeout(self._timeout_s):
                message = await self._client.messages.create_async(**params)
        except TwilioRestException as exc:
            raise _send_error(exc) from exc
        except TimeoutError as exc:
            raise SendError.no_answer("Twilio") from exc
        except aiohttp.ClientConnectorError as exc:
            raise SendError(f"Twilio unreachable: {exc}", retryable=True) from exc
        except aiohttp.ClientError as exc:
            raise SendError(
                f"connection to Twilio lost: {exc}", retryable=True, ambiguous=True
            ) from exc
        return SendResult(message.sid, TWILIO_STATUS.get(str(message.status), Delivery.QUEUED))

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


def _send_error(exc: TwilioRestException) -> SendError:
    status = int(exc.status or 0)
    code = int(exc.code) if exc.code else None
    text = f"Twilio {status}" + (f" error {code}" if code else "") + f": {exc.msg}"
    if code == UNSUBSCRIBED_RECIPIENT:
        return RecipientOptedOut(text, code=code)
    if is_retryable_status(status):
        return SendError(text, retryable=True, retry_after_s=_retry_after.get(), code=code)
    return SendError(text, retryable=False, code=code)
