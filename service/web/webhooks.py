"""Provider webhooks: read within limits, authenticate, parse, store, answer.

No model or provider call happens here: the reply is the worker's. A 2xx goes out only after
the message and its reply job are committed, so an acknowledged message is never lost.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response

from service.channels import sms
from service.settings import Settings
from service.store import update_delivery
from service.web.limits import BodyTooLarge, read_body

log = logging.getLogger(__name__)

FORM_TYPE = "application/x-www-form-urlencoded"


def _refuse(status: int, reason: str, started: float, path: str) -> Response:
    log.warning(
        "webhook %s refused: %s status=%d duration_ms=%d",
        path,
        reason,
        status,
        (time.perf_counter() - started) * 1000,
    )
    return Response(reason + "\n", status_code=status, media_type="text/plain")


def signed_url(request: Request, settings: Settings) -> str:
    """The URL Twilio signed: our public one behind proxies, else what this request says."""
    if not settings.public_base_url:
        return str(request.url)
    query = f"?{request.url.query}" if request.url.query else ""
    return f"{settings.public_base_url}{request.url.path}{query}"


async def _twilio_form(request: Request, started: float) -> dict[str, str] | Response:
    """The signed form of a Twilio request, or the refusal to send instead."""
    settings: Settings = request.app.state.services.settings
    path = request.url.path
    tokens = settings.twilio_auth_tokens
    if not tokens and not settings.parley_dev:
        return _refuse(
            403,
            "TWILIO_AUTH_TOKEN is not set: refusing unsigned traffic",
            started,
            path,
        )
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM_TYPE:
        return _refuse(400, f"expected {FORM_TYPE}", started, path)
    try:
        raw = await read_body(request, sms.MAX_WEBHOOK_BYTES)
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True)
    except BodyTooLarge:
        return _refuse(413, "request body over 64 KiB", started, path)
    except UnicodeDecodeError:
        return _refuse(400, "body is not UTF-8", started, path)
    if tokens and not sms.signature_is_valid(
        tokens,
        signed_url(request, settings),
        pairs,
        request.headers.get("x-twilio-signature"),
        request.headers.get("x-twilio-webhooks-signature-settings"),
    ):
        return _refuse(403, "bad or missing X-Twilio-Signature", started, path)
    return dict(pairs)


async def twilio_sms(request: Request) -> Response:
    started = time.perf_counter()
    form = await _twilio_form(request, started)
    if isinstance(form, Response):
        return form
    try:
        inbound = sms.parse_inbound(form)
    except sms.InvalidWebhook as exc:
        return _refuse(400, str(exc), started, request.url.path)
    recorded = await request.app.state.services.writer.record(inbound)
    log.info(
        "webhook sms conversation=%s message=%s outcome=%s duration_ms=%d",
        recorded.conversation_id,
        recorded.message_id or inbound.provider_message_id,
        "duplicate" if recorded.duplicate else ("enqueued" if recorded.enqueued else "stored"),
        (time.perf_counter() - started) * 1000,
    )
    return Response(sms.EMPTY_TWIML, media_type="text/xml")


async def twilio_status(request: Request) -> Response:
    started = time.perf_counter()
    form = await _twilio_form(request, started)
    if isinstance(form, Response):
        return form
    try:
        update = sms.parse_status(form)
    except sms.InvalidWebhook as exc:
        return _refuse(400, str(exc), started, request.url.path)
    moved = await update_delivery(
        request.app.state.services.engine,
        "sms",
        update.provider_message_id,
        update.status,
        update.error,
    )
    log.info(
        "webhook status sid=%s status=%s applied=%s",
        update.provider_message_id,
        update.status,
        moved,
    )
    return Response(status_code=204)
