"""SendGrid's v3 mail send through the sendgrid SDK, which is synchronous: it runs in a worker
thread so the event loop never blocks. Imported by `email.SendGridEmail` only with a key."""

from __future__ import annotations

import asyncio
import socket
import urllib.error

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Header, Mail

from service.channels.sendgrid.limits import MAX_SUBJECT_CHARS, header_text, header_token
from service.channels.sendgrid.mime import text_to_html
from service.retry import is_retryable_status, retry_after_seconds
from service.types import Delivery, Outbound, SendError, SendResult


class SendGridRest:
    def __init__(self, api_key: str, api_base_url: str, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._client = SendGridAPIClient(api_key, host=api_base_url.rstrip("/"))
        self._client.client.timeout = timeout_s

    async def send(self, outbound: Outbound) -> SendResult:
        mail = _mail(outbound)
        try:
            response = await asyncio.wait_for(
                asyncio.to_thread(self._client.send, mail), self._timeout_s + 5
            )
        except HTTPError as exc:
            raise _send_error(exc) from exc
        except TimeoutError as exc:
            raise SendError.no_answer("SendGrid") from exc
        except urllib.error.URLError as exc:
            ambiguous = isinstance(exc.reason, (TimeoutError, socket.timeout))
            raise SendError(
                f"SendGrid unreachable: {exc.reason}", retryable=True, ambiguous=ambiguous
            ) from exc
        message_id = response.headers.get("X-Message-Id") if response.headers else None
        return SendResult(message_id or outbound.headers.get("Message-ID"), Delivery.QUEUED)


def _mail(outbound: Outbound) -> Mail:
    """The SDK's mail, every header on one line: the last guard, whatever was stored."""
    mail = Mail(
        from_email=_address(outbound.from_),
        to_emails=_address(outbound.to),
        subject=header_text(outbound.subject or "")[:MAX_SUBJECT_CHARS] or "Re: your message",
        plain_text_content=outbound.body,
        html_content=text_to_html(outbound.body),
    )
    for name, value in outbound.headers.items():
        mail.add_header(Header(header_token(name), header_text(value)))
    return mail


def _address(address: str) -> str:
    """An address as it may go into a header, or a final refusal: never silently another one."""
    if not address or address != header_token(address):
        raise SendError(f"unsafe address {address[:80]!r}: not sent", retryable=False)
    return address


def _send_error(exc: HTTPError) -> SendError:
    status = int(getattr(exc, "status_code", 0) or 0)
    body = getattr(exc, "body", b"")
    detail = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    text = f"SendGrid {status}: {detail[:300]}"
    if is_retryable_status(status):
        headers = getattr(exc, "headers", None) or {}
        retry_after = headers.get("Retry-After") if hasattr(headers, "get") else None
        return SendError(text, retryable=True, retry_after_s=retry_after_seconds(retry_after))
    return SendError(text, retryable=False)
