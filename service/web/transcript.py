"""`GET /c/{token}`: the transcript page of one conversation, for whoever holds the link.

Server-rendered (Jinja2, autoescaped), no JavaScript. The page's only style sheet is inline and
allowed by its hash in a `default-src 'none'` Content-Security-Policy, so nothing else (no
script, image, frame or form target) can run or load even if a message smuggled markup past
escaping. Unknown and nearly right tokens get the same 404.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response

from service.media import describe
from service.models import Message
from service.store import conversations as admin
from service.types import (
    Author,
    Delivery,
    FixedText,
    InboundState,
    Intent,
    Sender,
    media_from_json,
)

if TYPE_CHECKING:
    import jinja2

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE = "transcript.html"


@functools.cache
def _template() -> jinja2.Template:
    """Compiled on the first page view, not at start: an idle process stays small."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    return environment.get_template(TEMPLATE)


def _style_hash() -> str:
    """CSP hash of the template's one `<style>` element, exactly as it is served."""
    source = (TEMPLATES / TEMPLATE).read_text(encoding="utf-8")
    match = re.search(r"<style>(.*?)</style>", source, re.DOTALL)
    if match is None:
        raise RuntimeError(f"{TEMPLATE} has no <style> element")
    digest = hashlib.sha256(match.group(1).encode("utf-8")).digest()
    return "sha256-" + base64.b64encode(digest).decode("ascii")


CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src '{_style_hash()}'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Robots-Tag": "noindex, nofollow",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}

# (label, tone) of each state; tone is "ok", "warn" or "bad".
_INBOUND = {
    InboundState.RECEIVED.value: ("waiting for a reply", "warn"),
    InboundState.ANSWERED.value: ("", "ok"),
    InboundState.NOT_ANSWERED.value: ("not answered", "ok"),
    InboundState.RATE_LIMITED.value: ("rate limited: not answered", "warn"),
    InboundState.FAILED.value: ("failed: no reply could be sent", "bad"),
}
_KEYWORDS = {
    Intent.OPT_OUT.value: "opt-out: no more replies",
    Intent.OPT_IN.value: "opted back in",
    Intent.NO_REPLY.value: "automatic mail: not answered",
    Intent.UNVERIFIED.value: "sender not verified (SPF failed, no DKIM pass): not answered",
    Intent.UNREADABLE.value: "no readable text: not answered",
}
_DELIVERY = {
    Delivery.PENDING.value: ("pending", "warn"),
    Delivery.SENDING.value: ("sending", "warn"),
    Delivery.NOT_SENT.value: ("not sent: no provider credentials", "warn"),
    Delivery.QUEUED.value: ("queued", "ok"),
    Delivery.SENT.value: ("sent", "ok"),
    Delivery.DELIVERED.value: ("delivered", "ok"),
    Delivery.UNDELIVERED.value: ("undelivered", "bad"),
    Delivery.FAILED.value: ("failed", "bad"),
}
_AUTHORS = {
    Author.MODEL.value: "Assistant",
    Author.OPERATOR.value: "Operator",
    Author.FIXED.value: "Automatic reply",
}
_FIXED = {
    FixedText.GREETING.value: "Greeting (automatic)",
    FixedText.AFTER_HOURS.value: "After-hours reply (automatic)",
}


@dataclass(frozen=True)
class Moment:
    iso: str
    text: str


@dataclass(frozen=True)
class Entry:
    id: int
    side: str  # "them" (the person) or "us"
    who: str
    operator: bool
    subject: str | None
    body: str
    at: Moment
    status: str
    tone: str
    error: str | None
    attachments: list[str]  # type and size of each, as `media.describe` says them


def moment(value: dt.datetime) -> Moment:
    utc = value.astimezone(dt.UTC)
    return Moment(utc.strftime("%Y-%m-%dT%H:%M:%SZ"), utc.strftime("%Y-%m-%d %H:%M UTC"))


def mask_address(address: str) -> str:
    """Enough to recognise, not enough to harvest: +1555•••1111, a•••@example.com."""
    if "@" in address:
        local, _, domain = address.rpartition("@")
        return f"{local[:1]}•••@{domain}"
    if len(address) >= 9:
        return f"{address[:5]}•••{address[-4:]}"
    return f"{address[:2]}•••{address[-2:]}" if len(address) > 4 else "•••"


def _entry(message: Message, remote: str) -> Entry:
    if message.sender == Sender.USER.value:
        status, tone = _INBOUND.get(message.status, (message.status, "ok"))
        if message.intent in _KEYWORDS and tone == "ok":
            status = _KEYWORDS[message.intent]
        elif message.status == InboundState.NOT_ANSWERED.value and message.error:
            status = f"not answered: {message.error}"  # e.g. outside opening hours
        who, side, operator = remote, "them", False
    else:
        status, tone = _DELIVERY.get(message.status, (message.status, "ok"))
        if message.status == Delivery.NOT_SENT.value and message.error:
            status = f"not sent: {message.error}"  # e.g. a WhatsApp template stood for it
        who = _FIXED.get(message.fixed_kind or "") or _AUTHORS.get(
            message.author or "", "Assistant"
        )
        side, operator = "us", message.author == Author.OPERATOR.value
    return Entry(
        id=message.id,
        side=side,
        who=who,
        operator=operator,
        subject=message.subject,  # only a channel with subjects (email) stores one
        body=message.body,
        at=moment(message.created_at),
        status=status,
        tone=tone,
        error=message.error if tone == "bad" else None,
        attachments=[describe(item) for item in media_from_json(message.media)],
    )


def render(detail: admin.Detail, channel_name: str, profile: str | None = None) -> str:
    """The page; `profile` is the assistant profile answering this conversation. The summary
    memory's existence is shown, never its text (it is the model's notes, not a message)."""
    conversation = detail.conversation
    remote = mask_address(conversation.remote_address)
    return _template().render(
        channel_name=channel_name,
        remote=remote,
        display_name=conversation.display_name,
        started=moment(conversation.created_at),
        opted_out=conversation.opted_out,
        paused=conversation.paused,
        profile=profile,
        summarised_through=conversation.memory_through_id if conversation.memory_summary else None,
        entries=[_entry(m, remote) for m in detail.messages],
    )


def not_found() -> Response:
    return PlainTextResponse("not found\n", status_code=404, headers=HEADERS)


async def page(request: Request) -> Response:
    token = str(request.path_params["conversation_url"])
    services = request.app.state.services
    try:
        detail = await admin.transcript(services.engine, token)
    except admin.NotFound:
        return not_found()
    channel_name = services.channels.display_name(detail.conversation.channel)
    profile = request.app.state.profiles.pick(detail.conversation.local_address).profile
    return HTMLResponse(render(detail, channel_name, profile), headers=HEADERS)
