"""`/api/…`: the operator's conversation API (SPEC §4), behind `Authorization: Bearer
$ADMIN_TOKEN`, compared in constant time. Without `ADMIN_TOKEN` every `/api` path answers 404,
as if the API did not exist; with it, every path (known or not) wants the token first.

Request and response bodies are pydantic models; errors are `{"error": "…"}`. Whatever a
client sends, a malformed request is a 4xx and one warning line, never a 500: ids and numbers
are checked as text before they become integers (Python refuses to convert more than 4300
digits), JSON that nests too deep is refused like any other unreadable body.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import secrets
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    computed_field,
    field_validator,
)
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from service.channels.base import ChannelPlugin
from service.media import describe
from service.models import Conversation
from service.request_body import BodyTooLarge, read_body
from service.settings import Settings
from service.store import conversations as admin
from service.types import Channel, media_from_json

log = logging.getLogger(__name__)

MAX_OPERATOR_CHARS = 10_000
MAX_REQUEST_BYTES = 64 * 1024
MAX_ID = 2**63 - 1
MAX_ID_DIGITS = len(str(MAX_ID))
_DECIMAL = re.compile(r"[0-9]+")
NO_STORE = {"Cache-Control": "no-store"}
JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json\s*(?:;.*)?$", re.IGNORECASE)


# ---------------------------------------------------------------- bodies


class ConversationOut(BaseModel):
    id: int
    channel: str
    remote_address: str
    local_address: str
    display_name: str | None
    summary: str
    message_count: int
    user_messages: int
    assistant_messages: int
    opted_out: bool
    paused: bool
    transcript_url: str
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def of(
        cls, conversation: Conversation, users: int, ours: int, base_url: str
    ) -> ConversationOut:
        return cls(
            id=conversation.id,
            channel=conversation.channel,
            remote_address=conversation.remote_address,
            local_address=conversation.local_address,
            display_name=conversation.display_name,
            summary=conversation.summary,
            message_count=users + ours,
            user_messages=users,
            assistant_messages=ours,
            opted_out=conversation.opted_out,
            paused=conversation.paused,
            transcript_url=admin.transcript_url(base_url, conversation.conversation_url),
            created_at=conversation.created_at,
            updated_at=conversation.updated_at,
        )


class ConversationPageOut(BaseModel):
    conversations: list[ConversationOut]
    total: int
    page: int
    page_size: int


class MediaOut(BaseModel):
    """One attachment: where Twilio keeps it, its type, its size once fetched (bytes), what
    became of it (`declared`, `fetched`, `unavailable`, `too_large`, `not_fetched`)."""

    url: str
    content_type: str
    size: int | None
    state: str
    description: str


class MessageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: dt.datetime
    updated_at: dt.datetime
    sender: str
    author: str | None
    fixed_kind: str | None = Field(description="for author fixed: help, greeting, after_hours")
    intent: str
    body: str
    subject: str | None
    headers: dict[str, Any] | None
    media: list[MediaOut] = Field(default_factory=list)
    status: str
    error: str | None
    provider_message_id: str | None
    reply_to_id: int | None

    @field_validator("media", mode="before")
    @classmethod
    def _typed_media(cls, value: object) -> list[dict[str, object]]:
        """The stored list as typed items (none for a message without attachments)."""
        return [
            {**item.to_json(), "description": describe(item)} for item in media_from_json(value)
        ]


class AssistantCallOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: dt.datetime
    message_id: int | None
    model: str
    purpose: str = Field(description="reply, or summary (folding old turns; never sent)")
    generation_params: dict[str, Any]
    processing_time: int = Field(description="milliseconds")
    status: str = Field(
        description="ok; error; superseded: answered, but dropped unsent for a newer message"
    )
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    error: str | None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def profile(self) -> str | None:
        """The assistant profile the call was made for (None: the variables alone)."""
        value = self.generation_params.get("profile")
        return value if isinstance(value, str) else None


class MemoryOut(BaseModel):
    """Whether the conversation has a summary memory and how far it reaches; not its text."""

    summary: bool
    through_message_id: int | None


class ConversationDetailOut(ConversationOut):
    profile: str | None
    memory: MemoryOut
    messages: list[MessageOut]
    assistant_calls: list[AssistantCallOut]


class OperatorMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    body: str = Field(max_length=MAX_OPERATOR_CHARS)

    @field_validator("body")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("body must not be empty")
        if "\x00" in value:
            raise ValueError("body must not contain NUL characters")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (`"\ud800"` in JSON)
                raise ValueError("body must be valid Unicode text") from None
        return value.strip()


class OperatorMessageOut(BaseModel):
    conversation_id: int
    message_ids: list[int]
    status: str = "pending"


# ---------------------------------------------------------------- helpers


def _json(model: BaseModel, status_code: int = 200) -> Response:
    return Response(
        model.model_dump_json(),
        status_code=status_code,
        media_type="application/json",
        headers=NO_STORE,
    )


def _error(request: Request, status_code: int, message: str, **extra: Any) -> JSONResponse:
    """A refusal: its JSON answer and one warning line (no traceback, no credentials)."""
    log.warning(
        "api %s %r refused: %s status=%d",
        request.method,
        request.url.path[:200],
        repr(message[:300])[1:-1],  # a caller's id may be in it: its control characters escaped
        status_code,
    )
    return JSONResponse({"error": message, **extra}, status_code=status_code, headers=NO_STORE)


def _whole_number(raw: str, most: int) -> int | None:
    """`raw` as an integer in 1..most, or None: checked as text first, so a 5000-digit value
    costs nothing and never reaches `int()`."""
    digits = raw.lstrip("0")
    if not _DECIMAL.fullmatch(raw) or len(digits) > MAX_ID_DIGITS:
        return None
    value = int(digits or "0")
    return value if 1 <= value <= most else None


def _base_url(request: Request, settings: Settings) -> str:
    """Where transcript links point: PUBLIC_BASE_URL, else the host this request came to."""
    return settings.public_base_url or f"{request.url.scheme}://{request.url.netloc}"


def _conversation_id(request: Request) -> int | None:
    """The path's id; None for anything that cannot be one (no such conversation: 404)."""
    return _whole_number(request.path_params["conversation_id"], MAX_ID)


def _positive_int(request: Request, name: str, default: int, most: int | None) -> int | str:
    """The query parameter's value, or the message saying why it is refused."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = _whole_number(raw, most or MAX_ID)
    if value is None:
        limit = f" and at most {most}" if most else ""
        return f"{name} must be a whole number of at least 1{limit}, got {raw[:40]!r}"
    return value


def _not_found(request: Request) -> JSONResponse:
    return _error(request, 404, f"no conversation {request.path_params['conversation_id'][:40]}")


# ---------------------------------------------------------------- routes


async def list_conversations(request: Request) -> Response:
    services = request.app.state.services
    page = _positive_int(request, "page", 1, None)
    page_size = _positive_int(request, "page_size", 20, admin.MAX_PAGE_SIZE)
    for value in (page, page_size):
        if isinstance(value, str):
            return _error(request, 400, value)
    assert isinstance(page, int) and isinstance(page_size, int)
    if (page - 1) * page_size > MAX_ID:
        return _error(request, 400, "page is out of range")
    found = await admin.list_conversations(services.engine, page, page_size)
    base = _base_url(request, services.settings)
    return _json(
        ConversationPageOut(
            conversations=[
                ConversationOut.of(o.conversation, o.user_messages, o.assistant_messages, base)
                for o in found.items
            ],
            total=found.total,
            page=page,
            page_size=page_size,
        )
    )


async def get_conversation(request: Request) -> Response:
    services = request.app.state.services
    conversation_id = _conversation_id(request)
    try:
        if conversation_id is None:
            raise admin.NotFound(request.path_params["conversation_id"])
        detail = await admin.conversation_detail(services.engine, conversation_id)
    except admin.NotFound:
        return _not_found(request)
    users = sum(1 for m in detail.messages if m.sender == "user")
    summary = ConversationOut.of(
        detail.conversation,
        users,
        len(detail.messages) - users,
        _base_url(request, services.settings),
    )
    return _json(
        ConversationDetailOut(
            **summary.model_dump(),
            profile=request.app.state.profiles.pick(detail.conversation.local_address).profile,
            memory=MemoryOut(
                summary=detail.conversation.memory_summary is not None,
                through_message_id=detail.conversation.memory_through_id,
            ),
            messages=[MessageOut.model_validate(m) for m in detail.messages],
            assistant_calls=[AssistantCallOut.model_validate(c) for c in detail.calls],
        )
    )


async def delete_conversation(request: Request) -> Response:
    conversation_id = _conversation_id(request)
    try:
        if conversation_id is None:
            raise admin.NotFound(conversation_id)
        await admin.delete_conversation(request.app.state.services.engine, conversation_id)
    except admin.NotFound:
        return _not_found(request)
    return Response(status_code=204, headers=NO_STORE)


async def _set_paused(request: Request, paused: bool) -> Response:
    conversation_id = _conversation_id(request)
    try:
        if conversation_id is None:
            raise admin.NotFound(conversation_id)
        await admin.set_paused(request.app.state.services.engine, conversation_id, paused)
    except admin.NotFound:
        return _not_found(request)
    return Response(status_code=204, headers=NO_STORE)


async def pause(request: Request) -> Response:
    return await _set_paused(request, True)


async def resume(request: Request) -> Response:
    return await _set_paused(request, False)


async def _operator_body(request: Request) -> OperatorMessageIn | Response:
    if not JSON_TYPE.match(request.headers.get("content-type", "")):
        return _error(request, 400, "expected a JSON body with Content-Type: application/json")
    try:
        raw = await read_body(request, MAX_REQUEST_BYTES)
    except BodyTooLarge:
        return _error(request, 413, f"request body over {MAX_REQUEST_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # unreadable, not UTF-8, or nested too deep
        data = None
    if not isinstance(data, dict):
        return _error(request, 400, 'expected a JSON object such as {"body": "…"}')
    try:
        return OperatorMessageIn.model_validate(data)
    except ValidationError as exc:
        problems = exc.errors(include_url=False, include_input=False, include_context=False)
        message = "; ".join(
            f"{'.'.join(map(str, p['loc'])) or 'request'}: {p['msg']}" for p in problems
        )
        return _error(request, 422, message, details=problems)


async def operator_message(request: Request) -> Response:
    """A human reply: stored as the operator's pending parts plus a reply job; the worker
    sends it like any reply (retried, never doubled), even while the conversation is paused."""
    services = request.app.state.services
    conversation_id = _conversation_id(request)
    body = await _operator_body(request)
    if isinstance(body, Response):
        return body
    try:
        if conversation_id is None:
            raise admin.NotFound(conversation_id)
        conversation = await admin.get_conversation(services.engine, conversation_id)
        channel = services.channels[Channel(conversation.channel)]
        envelope = await _envelope(request, conversation, channel)
        ids = await admin.add_operator_message(
            services.engine, conversation_id, body.body, envelope, channel.split
        )
    except admin.NotFound:
        return _not_found(request)
    except admin.OptedOut:
        return _error(
            request, 409, "the person opted out: nothing can be sent to them until they opt in"
        )
    if services.worker is not None:
        services.worker.wake()
    return _json(OperatorMessageOut(conversation_id=conversation_id, message_ids=ids), 202)


async def _envelope(
    request: Request, conversation: Conversation, channel: ChannelPlugin
) -> tuple[str | None, dict[str, str]]:
    """Subject and threading headers, as the channel builds them for any reply."""
    last = await admin.last_inbound(request.app.state.services.engine, conversation.id)
    if last is None:
        return None, {}
    headers = {k: v for k, v in (last.headers or {}).items() if isinstance(v, str)}
    subject, reply_headers = channel.reply_envelope(
        last.subject, headers, conversation.local_address
    )
    return subject, reply_headers


# ---------------------------------------------------------------- the app


class AdminOnly:
    """Every request through here needs the admin token; without one configured, 404."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = _refusal(Request(scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _refusal(request: Request) -> Response | None:
    settings: Settings = request.app.state.services.settings
    if not settings.admin_token:
        return _error(request, 404, "not found")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = settings.admin_token.encode("utf-8")
    if scheme.lower() == "bearer" and secrets.compare_digest(
        given.strip().encode("utf-8"), expected
    ):
        return None
    response = _error(
        request, 401, "missing or wrong bearer token (Authorization: Bearer $ADMIN_TOKEN)"
    )
    response.headers["WWW-Authenticate"] = 'Bearer realm="parley"'
    return response


async def _no_route(scope: Scope, receive: Receive, send: Send) -> None:
    await _error(Request(scope), 404, "no such API path")(scope, receive, send)


def create_api() -> ASGIApp:
    conversation = "/conversations/{conversation_id}"  # checked by `_conversation_id`
    return AdminOnly(
        Router(
            redirect_slashes=False,  # never a 3xx
            default=_no_route,
            routes=[
                Route("/conversations", list_conversations, methods=["GET"]),
                Route(conversation, get_conversation, methods=["GET"]),
                Route(conversation, delete_conversation, methods=["DELETE"]),
                Route(f"{conversation}/pause", pause, methods=["POST"]),
                Route(f"{conversation}/resume", resume, methods=["POST"]),
                Route(f"{conversation}/messages", operator_message, methods=["POST"]),
            ],
        )
    )
