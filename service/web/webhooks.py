"""Provider webhooks: read within limits, authenticate, parse, store, answer.

No model or provider call happens here: the reply is the worker's. A 2xx goes out only after
the message and its reply job are committed, so an acknowledged message is never lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response

from service import metrics, storable
from service.channels import email, sms
from service.settings import Settings
from service.store.conversations import is_stored, recent_replies
from service.store.errors import StorageFailure
from service.store.inbound import Recorded
from service.store.outbox import update_delivery
from service.types import Channel, Inbound
from service.web.limits import BodyTooLarge, read_body

log = logging.getLogger(__name__)

FORM_TYPE = "application/x-www-form-urlencoded"


def _refuse(status: int, reason: str, started: float, path: str) -> Response:
    metrics.count_webhook(path, metrics.refusal_result(status))
    log.warning(
        "webhook %s refused: %s status=%d duration_ms=%d",
        path,
        reason,
        status,
        (time.perf_counter() - started) * 1000,
    )
    return Response(reason + "\n", status_code=status, media_type="text/plain")


async def _store(request: Request, inbound: Inbound, started: float) -> Response | None:
    """Hand the message to the inbound writer and wait for its commit; count and log it.
    Returns the refusal to send instead of the 2xx: 400 for what cannot be stored, 503 while
    the database is unavailable."""
    path = request.url.path
    try:
        recorded: Recorded = await request.app.state.services.writer.record(inbound)
    except storable.Unstorable as exc:
        return _refuse(400, str(exc), started, path)
    except StorageFailure as exc:
        return _refuse(exc.status, str(exc), started, path)
    metrics.count_inbound(inbound.channel.value, recorded.duplicate, recorded.enqueued)
    if recorded.duplicate:
        outcome = "duplicate"
    else:
        outcome = "enqueued" if recorded.enqueued else f"stored ({inbound.intent})"
    log.info(
        "webhook %s conversation=%s message=%s outcome=%s duration_ms=%d",
        inbound.channel,
        recorded.conversation_id or "-",
        recorded.message_id or "-",
        outcome,
        (time.perf_counter() - started) * 1000,
    )
    return None


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
    form = dict(pairs)
    if settings.twilio_account_sid and form.get("AccountSid") != settings.twilio_account_sid:
        return _refuse(403, "AccountSid is not TWILIO_ACCOUNT_SID", started, path)
    return form


async def twilio_sms(request: Request) -> Response:
    started = time.perf_counter()
    form = await _twilio_form(request, started)
    if isinstance(form, Response):
        return form
    try:
        inbound = sms.parse_inbound(form)
    except sms.InvalidWebhook as exc:
        return _refuse(400, str(exc), started, request.url.path)
    return await _store(request, inbound, started) or Response(
        sms.EMPTY_TWIML, media_type="text/xml"
    )


async def twilio_status(request: Request) -> Response:
    started = time.perf_counter()
    form = await _twilio_form(request, started)
    if isinstance(form, Response):
        return form
    try:
        update = sms.parse_status(form)
    except sms.InvalidWebhook as exc:
        return _refuse(400, str(exc), started, request.url.path)
    try:
        moved = await update_delivery(
            request.app.state.services.engine,
            "sms",
            update.provider_message_id,
            update.status,
            update.error,
        )
    except StorageFailure as exc:
        return _refuse(exc.status, str(exc), started, request.url.path)
    metrics.count_webhook(request.url.path, "applied" if moved else "ignored")
    log.info(
        "webhook status sid=%s status=%s applied=%s duration_ms=%d",
        update.provider_message_id,
        update.status,
        moved,
        (time.perf_counter() - started) * 1000,
    )
    return Response(status_code=204)


def _email_credentials_refusal(request: Request, started: float) -> Response | None:
    settings: Settings = request.app.state.services.settings
    user, password = settings.sendgrid_inbound_user, settings.sendgrid_inbound_password
    if not user or not password:
        if settings.parley_dev:
            return None
        reason = "SENDGRID_INBOUND_USER and SENDGRID_INBOUND_PASSWORD are not set: refusing traffic"
    elif email.credentials_match(request.headers.get("authorization"), user, password):
        return None
    else:
        reason = "bad or missing credentials"
    response = _refuse(401, reason, started, request.url.path)
    response.headers["WWW-Authenticate"] = 'Basic realm="parley inbound parse"'
    return response


async def _receive_mail(
    request: Request, raw: bytes, content_type: str, started: float
) -> Response | None:
    """Header-level read, then the dedupe check, then body extraction, then the commit. A
    redelivery of a stored mail stops at the second step: a retried hostile mail costs no
    extraction. Raises `email.InvalidInbound` for a post that is not a usable mail; returns
    the storage refusal to send instead of the 2xx, if any."""
    services = request.app.state.services
    # The form split and the capped header parse are linear, pure Python: a thread suffices.
    envelope = await asyncio.to_thread(email.read_envelope, raw, content_type)
    stored_id = storable.provider_id(envelope.provider_message_id)  # as the writer stores it
    if await is_stored(services.engine, Channel.EMAIL.value, stored_id):
        metrics.count_inbound(Channel.EMAIL.value, duplicate=True, enqueued=False)
        log.info(
            "webhook email message=%s outcome=duplicate duration_ms=%d",
            envelope.provider_message_id[:80],
            (time.perf_counter() - started) * 1000,
        )
        return None
    own_replies = await recent_replies(
        services.engine, Channel.EMAIL.value, envelope.remote_address, envelope.local_address
    )
    extracted = await services.extractor.extract(
        dataclasses.replace(
            envelope.content, subject=envelope.subject, own_replies=tuple(own_replies)
        )
    )
    if extracted.problem:
        log.warning(
            "email %s: %s; using its truncated, unstripped text",
            envelope.provider_message_id[:80],
            extracted.problem,
        )
    return await _store(request, envelope.inbound(extracted), started)


async def sendgrid_inbound(request: Request) -> Response:
    """Inbound Parse. Never a redirect, and 2xx only once stored: SendGrid retries 5xx."""
    started = time.perf_counter()
    refusal = _email_credentials_refusal(request, started)
    if refusal is not None:
        return refusal
    settings: Settings = request.app.state.services.settings
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        return _refuse(400, "expected multipart/form-data", started, request.url.path)
    try:
        raw = await read_body(request, settings.max_email_bytes)
        refusal = await _receive_mail(request, raw, content_type, started)
    except BodyTooLarge:
        return _refuse(413, "email over MAX_EMAIL_BYTES", started, request.url.path)
    except email.InvalidInbound as exc:
        return _refuse(400, str(exc), started, request.url.path)
    return refusal or Response("ok\n", media_type="text/plain")
