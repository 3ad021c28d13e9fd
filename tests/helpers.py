"""Small tools the tests share: replaying recorded webhooks, signing variants of them, reading
what Parley stored, and waiting for the worker without fixed sleeps."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.models import AssistantCall, Conversation, Message, ReplyJob
from service.testing import sign

FIXTURES = Path(__file__).parent / "fixtures"
TWILIO_TOKEN = "test-auth-token-0123456789abcdef"
PUBLIC_BASE_URL = "https://parley.example.com"


def recording(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    return data


def form_of(name: str) -> dict[str, str]:
    return dict(parse_qsl(recording(name)["body"], keep_blank_values=True))


async def replay(client: httpx.AsyncClient, name: str) -> httpx.Response:
    """Send a recorded webhook exactly as recorded (headers, body, signature)."""
    data = recording(name)
    headers = {k: v for k, v in data["headers"].items() if k.lower() != "content-length"}
    return await client.request(
        data["method"], data["path"], headers=headers, content=recorded_body(data)
    )


def recorded_body(data: dict[str, Any]) -> bytes:
    if "body_b64" in data:
        return base64.b64decode(data["body_b64"])
    return str(data["body"]).encode("utf-8")


def twilio_form(name: str = "twilio/sms_hello.json", **fields: str | None) -> dict[str, str]:
    """A recorded form with some fields changed (None removes one); a fresh MessageSid unless
    one is given, so each call is a new message."""
    form = form_of(name)
    if "MessageSid" not in fields:
        sid = "SM" + secrets.token_hex(16)
        fields = {"MessageSid": sid, "SmsSid": sid, "SmsMessageSid": sid, **fields}
    for key, value in fields.items():
        if value is None:
            form.pop(key, None)
        else:
            form[key] = value
    return form


async def post_twilio(
    client: httpx.AsyncClient,
    form: dict[str, str],
    path: str = "/webhooks/twilio/sms",
    token: str = TWILIO_TOKEN,
    signed_url: str | None = None,
    signature: str | None = None,
) -> httpx.Response:
    """Post a form the way Twilio does, signed with `token` for `signed_url`."""
    body = urlencode(form)
    headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "TwilioProxy/1.1"}
    headers["X-Twilio-Signature"] = (
        signature
        if signature is not None
        else sign(token, signed_url or PUBLIC_BASE_URL + path, form)
    )
    return await client.post(path, content=body, headers=headers)


async def eventually(
    check: Callable[[], Awaitable[Any] | Any], timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll a check (async, or a plain condition) until it returns something truthy; fail with
    its last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")


async def rows(engine: AsyncEngine, model: Any, *where: Any) -> list[Any]:
    async with engine.connect() as connection:
        result = await connection.execute(
            select(model).where(*where).order_by(model.id)  # type: ignore[attr-defined]
        )
        return list(result)


async def messages(engine: AsyncEngine, *where: Any) -> list[Any]:
    return await rows(engine, Message, *where)


async def conversations(engine: AsyncEngine, *where: Any) -> list[Any]:
    return await rows(engine, Conversation, *where)


async def jobs(engine: AsyncEngine, *where: Any) -> list[Any]:
    return await rows(engine, ReplyJob, *where)


async def calls(engine: AsyncEngine, *where: Any) -> list[Any]:
    return await rows(engine, AssistantCall, *where)


async def settled(engine: AsyncEngine) -> bool:
    """No job queued or running: the worker has nothing left to do."""
    pending = await jobs(engine, ReplyJob.status.in_(["queued", "running"]))
    return not pending


def one_warning(records: list[logging.LogRecord], containing: str) -> str:
    """The one warning line a refused request logs: no other warning, no traceback."""
    warnings = [r for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    [record] = warnings
    message = record.getMessage()
    assert record.exc_info is None and "\n" not in message, message
    assert containing in message, message
    return message
