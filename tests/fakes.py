"""Loopback fakes of Twilio, SendGrid and OpenAI that the *real* SDKs talk to.

Why: mocking the SDKs would hide the bugs that matter most here (wrong URL,
wrong encoding, an exception type the SDK really raises on a 429, a timeout
that the SDK silently ignores).  So tests run a small starlette app on
127.0.0.1 in a background thread and point each SDK at it::

    with FakeProviders() as fake:
        fake.twilio_plan(500, "ok")
        ...  # drive the service
        fake.wait_for(lambda: len(fake.twilio_sent) == 1)

How each SDK is pointed at ``fake.base_url`` (verified in tests/integration/test_fakes.py):

* twilio 9.x -- ``client = Client(sid, token, http_client=AsyncTwilioHttpClient())``
  then ``client.api.base_url = fake.base_url``.  ``client.messages`` is a
  shortcut into ``client.api`` so it follows the override, and list paging
  (``next_page_uri``) is resolved against the same base URL.  Caveats:

  - ``TWILIO_REGION`` / ``TWILIO_EDGE`` (or ``region=``/``edge=``) must be
    unset: the SDK then rewrites the host and, because "127.0.0.1" has four
    dot-separated parts, mangles it as if it were ``api.<region>.twilio.com``.
  - ``AsyncTwilioHttpClient(timeout=...)`` is accepted but IGNORED: its
    ``request()`` only uses the per-call ``timeout`` argument, which the
    resource methods (``messages.create_async``) never pass, and aiohttp
    turns ``timeout=None`` into "no timeout at all" (not the session default).
    Bound a send with ``asyncio.timeout(...)`` or an http client subclass
    that substitutes ``self.timeout``.  The sync ``TwilioHttpClient(timeout=)``
    does honour it.
  - ``date_sent_after=`` is serialised with ``strftime("%Y-%m-%dT%H:%M:%SZ")``
    without converting to UTC: pass a UTC datetime.

* sendgrid 6.x -- ``SendGridAPIClient(api_key, host=fake.base_url)``; the
  ``/v3`` prefix is added by the SDK.  It is synchronous (urllib), has no
  timeout by default (blocks forever); set ``sg.client.timeout = seconds``
  before ``.send`` (child clients copy it).  Non-2xx answers are raised as
  ``python_http_client.exceptions.HTTPError`` subclasses
  (``TooManyRequestsError``, ``InternalServerError``, ...).

* openai -- ``AsyncOpenAI(api_key=..., base_url=fake.base_url + "/v1")``;
  use ``max_retries=0`` when a test wants to see the first failure, since the
  SDK otherwise retries 429/5xx/timeouts on its own (honouring Retry-After).

Simulation choices worth knowing:

* A ``("hang", s)`` request is never recorded; after ``s`` seconds it is
  answered with a provider-shaped 504, so a client patient enough to wait
  sees a retryable failure rather than an unrecorded success.
* Twilio's create answer says ``status: "queued"`` and ``date_sent: null``
  (as the real API does), but the list endpoint shows accepted messages as
  ``"sent"`` with ``date_sent = date_created`` so ``DateSent`` filters find a
  message the moment it was accepted.  (Real Twilio fills ``date_sent`` only
  once the carrier hand-off happens, usually within a second.)
* Twilio sends are validated like the real API (auth, To/From/Body, E.164
  ``To``, 1600-character body) so service bugs surface as real error codes.
* No status callbacks are made; tests post those webhooks themselves.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import hashlib
import http
import json
import math
import re
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, TypeAlias, TypeVar
from urllib.parse import urlencode

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = ["FakeMedia", "FakeProviders", "PlanAction", "default_openai_reply", "image_parts"]

PlanAction: TypeAlias = (
    Literal["ok"]
    | int
    | tuple[int, float]
    | tuple[Literal["error"], int, int, str]
    | tuple[Literal["hang", "accept_then_hang"], float]
)
"""One planned answer: "ok", 500, (429, retry_after), ("error", status,
code, message), ("hang", seconds) or ("accept_then_hang", seconds)."""

Provider: TypeAlias = Literal["twilio", "sendgrid", "openai"]
T = TypeVar("T")

_TWILIO_MESSAGES = "/2010-04-01/Accounts/{sid}/Messages.json"
_TWILIO_MEDIA = "/2010-04-01/Accounts/{sid}/Messages/{message_sid}/Media/{media_sid}"
_MEDIA_CDN = "/cdn/media/{media_sid}"  # where Twilio's media URL redirects (its CDN)
_MEDIA_CHUNK = 64 * 1024
MEDIA_ACCOUNT_SID = "AC32d0d85518aa25edef571b53f079c2be"  # the tests' TWILIO_ACCOUNT_SID
_E164 = re.compile(r"^\+[1-9]\d{1,14}$")
_CHANNEL_ADDRESS = re.compile(r"^[a-z]+:.+$")
_WHATSAPP = "whatsapp:"
_GSM_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENDED = set("^{}\\[~]|€\f")


# --------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class _Planned:
    """A normalised plan action, so handlers never re-parse tuples."""

    kind: Literal["ok", "status", "error", "hang", "accept_then_hang"]
    status: int = 200
    retry_after: float | None = None
    code: int | None = None
    message: str | None = None
    seconds: float = 0.0

    @property
    def label(self) -> str:
        """Short outcome name stored in the ``*_attempts`` logs."""
        if self.kind == "status":
            return str(self.status)
        if self.kind == "error":
            return f"error:{self.code}"
        return self.kind


_OK = _Planned("ok")


def _parse_action(action: PlanAction) -> _Planned:
    """Validate eagerly so a typo fails in the test, not in the server thread."""
    if action == "ok":
        return _OK
    if isinstance(action, int) and not isinstance(action, bool):
        return _parse_status(action, None)
    if isinstance(action, tuple) and action:
        head = action[0]
        if isinstance(head, int) and len(action) == 2:
            return _parse_status(head, float(action[1]))
        if head in ("hang", "accept_then_hang") and len(action) == 2:
            return _Planned(head, seconds=float(action[1]))
        if head == "error" and len(action) == 4:
            _, status, code, message = action
            return _Planned("error", status=int(status), code=int(code), message=str(message))
    raise ValueError(f"unknown plan action: {action!r}")


def _parse_status(status: int, retry_after: float | None) -> _Planned:
    """A bare HTTP status (optionally with Retry-After) as a provider error."""
    if not 400 <= status <= 599:
        raise ValueError(f"plan status must be 4xx/5xx, got {status}")
    return _Planned("status", status=status, retry_after=retry_after)


def _retry_after_header(planned: _Planned) -> dict[str, str]:
    """Retry-After as integer seconds when possible (what HTTP allows)."""
    if planned.retry_after is None:
        return {}
    value = planned.retry_after
    text = str(int(value)) if value == int(value) else f"{value:g}"
    return {"Retry-After": text}


def _phrase(status: int) -> str:
    """Reason phrase used as the default error message."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# --------------------------------------------------------------------------
# Media (MMS attachments)


@dataclass
class FakeMedia:
    """One media item the fake Twilio serves at its Media URL (`FakeProviders.serve_media`).

    Like Twilio: the Media URL needs HTTP Basic auth and answers a 307 to a second path (its
    CDN), which serves the bytes. `failures` are answered at the Media URL first, one per
    fetch (500, 404...); the first `slow_times` fetches wait `slow_s` before the bytes;
    `stream_bytes` makes an over-sized item: that many bytes, streamed without Content-Length
    (`declare_length=True` sends the header)."""

    content: bytes = b""
    content_type: str = "image/jpeg"
    failures: list[int] = field(default_factory=list)
    slow_s: float = 0.0
    slow_times: int = 0
    stream_bytes: int | None = None
    declare_length: bool = False
    streamed: int = 0  # bytes of `stream_bytes` the fake managed to hand over


def image_parts(request_json: dict[str, Any]) -> list[list[str]]:
    """The image URLs (`data:` URLs) of each message of a chat request, in order."""
    found = []
    for message in request_json.get("messages", []):
        content = message.get("content")
        parts = content if isinstance(content, list) else []
        found.append(
            [
                p["image_url"]["url"]
                for p in parts
                if isinstance(p, dict) and p.get("type") == "image_url"
            ]
        )
    return found


# --------------------------------------------------------------------------
# Small request helpers


def _basic_auth(request: Request) -> tuple[str, str] | None:
    """Decode HTTP Basic credentials (what the twilio SDK sends)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def _bearer(request: Request) -> str | None:
    """The Bearer token (what the sendgrid and openai SDKs send)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _form_fields(form: FormData) -> dict[str, Any]:
    """Form fields as a dict; repeated keys (e.g. MediaUrl) become lists."""
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        text = value if isinstance(value, str) else str(value)
        if key not in fields:
            fields[key] = text
        elif isinstance(fields[key], list):
            fields[key].append(text)
        else:
            fields[key] = [fields[key], text]
    return fields


def _rfc2822(moment: datetime) -> str:
    """Twilio's date format: 'Mon, 25 Nov 2024 10:36:00 +0000'."""
    return email.utils.format_datetime(moment)


# --------------------------------------------------------------------------
# Twilio shapes


def _twilio_error_body(status: int, code: int | None, message: str) -> dict[str, Any]:
    """Twilio's REST error JSON, which the SDK parses into TwilioRestException."""
    code = code if code is not None else 20000 + status
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def _twilio_error(status: int, code: int, message: str) -> JSONResponse:
    """An immediate Twilio error answer (validation/auth failures)."""
    return JSONResponse(_twilio_error_body(status, code, message), status_code=status)


def _twilio_validate(fields: dict[str, Any]) -> tuple[int, str] | None:
    """The checks real Twilio makes on a send, as (code, message)."""
    to, body = fields.get("To"), fields.get("Body")
    if not to:
        return 21604, "A 'To' phone number is required."
    if not (fields.get("From") or fields.get("MessagingServiceSid")):
        return 21603, "A 'From' phone number is required."
    if not (body or fields.get("MediaUrl") or fields.get("ContentSid")):
        return 21602, "Message body is required."
    if not (_E164.match(str(to)) or _CHANNEL_ADDRESS.match(str(to))):
        return 21211, f"Invalid 'To' Phone Number: {to}"
    if isinstance(body, str) and len(body) > 1600:
        return 21617, "The concatenated message body exceeds the 1600 character limit."
    return _whatsapp_validate(fields)


def _whatsapp_validate(fields: dict[str, Any]) -> tuple[int, str] | None:
    """WhatsApp's rules on a send: both addresses `whatsapp:+E164`, a template's variables
    a JSON object."""
    to, from_ = str(fields.get("To")), str(fields.get("From") or "")
    if to.startswith(_WHATSAPP) or from_.startswith(_WHATSAPP):
        if not _E164.match(to.removeprefix(_WHATSAPP)) or not to.startswith(_WHATSAPP):
            return 21211, f"Invalid 'To' Phone Number: {to}"
        if not (from_.startswith(_WHATSAPP) and _E164.match(from_.removeprefix(_WHATSAPP))):
            return 63007, "Twilio could not find a Channel with the specified From address"
    if "ContentSid" in fields:
        try:
            variables = json.loads(str(fields.get("ContentVariables") or "{}"))
        except ValueError:
            variables = None
        if not isinstance(variables, dict):
            return 21656, "The ContentVariables Parameter is invalid."
    return None


def _num_segments(body: str) -> int:
    """SMS segments: GSM-7 160/153 septets, otherwise UCS-2 70/67 units."""
    if all(ch in _GSM_BASIC or ch in _GSM_EXTENDED for ch in body):
        units = len(body) + sum(ch in _GSM_EXTENDED for ch in body)
        single, multi = 160, 153
    else:
        units = len(body.encode("utf-16-le")) // 2
        single, multi = 70, 67
    return 1 if units <= single else math.ceil(units / multi)


def _twilio_message_json(record: dict[str, Any], *, listed: bool) -> dict[str, Any]:
    """A Message resource; as listed later it reads 'sent' (see module doc)."""
    sid, account = record["sid"], record["account_sid"]
    created = _rfc2822(record["date_created"])
    base = _TWILIO_MESSAGES.format(sid=account)[: -len(".json")]
    media = record.get("MediaUrl") or []
    return {
        "account_sid": account,
        "api_version": "2010-04-01",
        "body": record.get("Body", ""),
        "date_created": created,
        "date_sent": created if listed else None,
        "date_updated": created,
        "direction": "outbound-api",
        "error_code": None,
        "error_message": None,
        "from": record.get("From"),
        "messaging_service_sid": record.get("MessagingServiceSid"),
        "num_media": str(len(media) if isinstance(media, list) else 1),
        "num_segments": str(_num_segments(record.get("Body", ""))),
        "price": None,
        "price_unit": "USD",
        "sid": sid,
        "status": "sent" if listed else "queued",
        "subresource_uris": {
            "media": f"{base}/{sid}/Media.json",
            "feedback": f"{base}/{sid}/Feedback.json",
        },
        "to": record.get("To"),
        "uri": f"{base}/{sid}.json",
    }


def _parse_twilio_date(value: str) -> tuple[datetime, bool]:
    """Parse a DateSent filter value; the flag says it was a bare date."""
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC), True
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)), False


def _date_filter(op: str, value: str) -> Callable[[datetime], bool]:
    """Twilio's DateSent / DateSent< / DateSent> (inclusive, 'on and after')."""
    bound, date_only = _parse_twilio_date(value)

    def key(moment: datetime) -> Any:
        return moment.date() if date_only else moment

    edge = key(bound)
    if op == "<":
        return lambda moment: key(moment) <= edge
    if op == ">":
        return lambda moment: key(moment) >= edge
    return lambda moment: key(moment) == edge


RecordCheck: TypeAlias = Callable[[dict[str, Any]], bool]


def _field_is(field: str, wanted: str) -> RecordCheck:
    """Exact match on a form field, as Twilio's To/From filters are."""
    return lambda record: record.get(field) == wanted


def _sent_when(test: Callable[[datetime], bool]) -> RecordCheck:
    """Apply a DateSent test to the record's date (see module doc)."""
    return lambda record: test(record["date_created"])


def _twilio_matches(query: dict[str, str]) -> RecordCheck:
    """Build the list endpoint's record filter from its query string."""
    checks = [_field_is(field, query[field]) for field in ("To", "From") if query.get(field)]
    for op in ("", "<", ">"):
        if query.get("DateSent" + op):
            checks.append(_sent_when(_date_filter(op, query["DateSent" + op])))
    return lambda record: all(check(record) for check in checks)


def _twilio_list_page(
    sid: str, query: dict[str, str], records: list[dict[str, Any]]
) -> dict[str, Any]:
    """One page of Twilio's list JSON, newest first, with working paging URIs."""
    size = max(1, min(int(query.get("PageSize", "50")), 1000))
    page = max(0, int(query.get("Page", "0")))
    matching = sorted(filter(_twilio_matches(query), records), key=lambda r: r["seq"], reverse=True)
    chunk = matching[page * size : (page + 1) * size]
    filters = {k: v for k, v in query.items() if k not in ("Page", "PageSize", "PageToken")}

    def uri(number: int) -> str:
        query_string = urlencode({**filters, "PageSize": size, "Page": number})
        return f"{_TWILIO_MESSAGES.format(sid=sid)}?{query_string}"

    return {
        "messages": [_twilio_message_json(rec, listed=True) for rec in chunk],
        "page": page,
        "page_size": size,
        "first_page_uri": uri(0),
        "next_page_uri": uri(page + 1) if len(matching) > (page + 1) * size else None,
        "previous_page_uri": uri(page - 1) if page > 0 else None,
        "uri": uri(page),
        "start": page * size,
        "end": page * size + max(len(chunk) - 1, 0),
    }


# --------------------------------------------------------------------------
# SendGrid and OpenAI shapes


def _sendgrid_error_body(status: int, code: int | None, message: str) -> dict[str, Any]:
    """SendGrid v3 error JSON (it has no numeric error codes; ``code`` is unused)."""
    del status, code
    return {"errors": [{"message": message, "field": None, "help": None}]}


def _sendgrid_error(status: int, message: str, field: str | None = None) -> JSONResponse:
    """An immediate SendGrid error answer (validation/auth failures)."""
    body = {"errors": [{"message": message, "field": field, "help": None}]}
    return JSONResponse(body, status_code=status)


def _sendgrid_validate(body: Any) -> tuple[str, str] | None:
    """The checks /v3/mail/send makes, as (field, message)."""
    if not isinstance(body, dict):
        return "", "Bad Request"
    people = body.get("personalizations")
    if not isinstance(people, list) or not people:
        people = [None]
    if not all(isinstance(p, dict) and p.get("to") for p in people):
        return (
            "personalizations",
            "The personalizations field is required and must have at least one"
            " personalization with a 'to'.",
        )
    if not (body.get("from") or {}).get("email"):
        return "from.email", "The from email does not contain a valid address."
    if body.get("template_id"):
        return None
    if not body.get("content"):
        return (
            "content",
            "Unless a valid template_id is provided, the content parameter is required.",
        )
    if not (body.get("subject") or all(p.get("subject") for p in people)):
        return "subject", "The subject is required."
    return None


def _openai_error_body(status: int, code: int | None, message: str) -> dict[str, Any]:
    """OpenAI's error JSON, which the SDK maps to APIStatusError subclasses."""
    if status == 429:
        kind, default_code = "requests", "rate_limit_exceeded"
    else:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        default_code = None
    wire_code = str(code) if code is not None else default_code
    return {"error": {"message": message, "type": kind, "param": None, "code": wire_code}}


def _text_of(content: Any) -> str:
    """Message content as text, also for the list-of-parts form."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def default_openai_reply(request_json: dict[str, Any]) -> str:
    """Deterministic default: 'echo: ' + the last user message's text."""
    users = [m for m in request_json.get("messages", []) if m.get("role") == "user"]
    return "echo: " + (_text_of(users[-1].get("content")) if users else "")


def _approx_tokens(text: str) -> int:
    """Deterministic token estimate (~4 characters a token) for usage fields."""
    return max(1, math.ceil(len(text) / 4))


def _chat_completion(request_json: dict[str, Any], reply: str) -> dict[str, Any]:
    """A ChatCompletion the openai SDK parses without complaint."""
    messages = request_json.get("messages", [])
    prompt = sum(_approx_tokens(_text_of(m.get("content"))) + 3 for m in messages) + 3
    completion = _approx_tokens(reply)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply,
        "refusal": None,
        "annotations": [],
    }
    return {
        "id": "chatcmpl-" + secrets.token_hex(12),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request_json.get("model", ""),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "system_fingerprint": "fp_fake",
    }


def _openai_error(status: int, message: str, code: str | None = None) -> JSONResponse:
    """An immediate OpenAI error answer (validation/auth failures)."""
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    return JSONResponse(body, status_code=status)


ErrorBody: TypeAlias = Callable[[int, int | None, str], dict[str, Any]]


# --------------------------------------------------------------------------
# The server


class FakeProviders:
    """Fake Twilio + SendGrid + OpenAI HTTP APIs on one loopback port.

    Records and plans are guarded by one lock; every public attribute that
    returns records returns a fresh snapshot list, safe to read from any
    thread while the server thread keeps appending.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 10.0
    ) -> None:
        """``port=0`` picks a free port; nothing runs until start()/``with``."""
        self._host, self._port, self._startup_timeout = host, port, startup_timeout
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()  # set: every current sleep ends (reset/stop)
        self._generation = 0  # bumped by reset(); older requests stop counting
        self._bound_port: int | None = None
        self._app = self._build_app()
        self._clear()

    # -- lifecycle -------------------------------------------------------

    def start(self) -> FakeProviders:
        """Bind, start the server thread, and return once it is listening."""
        if self._thread is not None:
            raise RuntimeError("FakeProviders already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        self._bound_port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_config=None,
            log_level=None,
            access_log=False,
            lifespan="off",
            ws="none",
            backlog=4096,
            timeout_graceful_shutdown=1,
        )  # fmt: skip -- log_config/log_level None: leave the tests' logging alone
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._serve, args=(self._server, sock), name="fake-providers", daemon=True
        )
        self._thread.start()
        self._wait_started()
        return self

    def stop(self) -> None:
        """Stop promptly: sleeping handlers (hangs, openai_delay) wake and answer now."""
        if self._server is None or self._thread is None:
            return
        with self._lock:
            self._wake_sleepers()
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> FakeProviders:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> FakeProviders:
        """``async with`` variant: start/stop off the caller's event loop."""
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    def _serve(self, server: uvicorn.Server, sock: socket.socket) -> None:
        """Thread body: a private event loop, so any test loop can call us."""
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve_then_cancel(server, sock))
        finally:
            sock.close()
            loop.close()
            self._loop = None

    async def _serve_then_cancel(self, server: uvicorn.Server, sock: socket.socket) -> None:
        """Run uvicorn; afterwards cancel anything that outlived the grace period."""
        self._loop = asyncio.get_running_loop()
        await server.serve(sockets=[sock])
        leftovers = asyncio.all_tasks() - {asyncio.current_task()}
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    def _wait_started(self) -> None:
        """Block until uvicorn accepts connections, or fail loudly."""
        assert self._server is not None and self._thread is not None
        deadline = time.monotonic() + self._startup_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("fake provider server died during startup")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("fake provider server did not start")
            time.sleep(0.005)

    @property
    def port(self) -> int:
        """The bound TCP port (after start)."""
        if self._bound_port is None or self._server is None:
            raise RuntimeError("FakeProviders is not running")
        return self._bound_port

    @property
    def base_url(self) -> str:
        """'http://127.0.0.1:PORT' -- no trailing slash, no path."""
        return f"http://{self._host}:{self.port}"

    # -- records (snapshots) ----------------------------------------------

    def _snapshot(self, items: list[T]) -> list[T]:
        with self._lock:
            return list(items)

    @property
    def twilio_sent(self) -> list[dict[str, Any]]:
        """Accepted Twilio sends in arrival order: form fields plus sid,
        account_sid, date_created (aware UTC, whole seconds), time (epoch),
        auth ((user, password)) and seq."""
        return self._snapshot(self._twilio_sent)

    @property
    def sendgrid_sent(self) -> list[dict[str, Any]]:
        """Accepted SendGrid sends: {json, headers (lower-case), message_id, time}."""
        return self._snapshot(self._sendgrid_sent)

    @property
    def openai_requests(self) -> list[dict[str, Any]]:
        """Request JSON of every chat request the plan let through ("ok")."""
        return self._snapshot(self._openai_requests)

    @property
    def media_requests(self) -> list[dict[str, Any]]:
        """Every media GET (Media URL and CDN hop): {path, auth ((user, password) or None),
        outcome ('redirect', 'ok', '404', '500', 'unauthorized', 'streamed'), time}."""
        return self._snapshot(self._media_requests)

    @property
    def openai_image_parts(self) -> list[list[list[str]]]:
        """For each chat request the fake answered: each message's image URLs, in order."""
        return [image_parts(request) for request in self.openai_requests]

    def serve_media(self, media_sid: str, item: FakeMedia) -> str:
        """Serve `item`; returns its Media URL, as Twilio puts it in `MediaUrl{i}`."""
        with self._lock:
            self._media[media_sid] = item
        return self.media_url(media_sid)

    def media_url(self, media_sid: str, account_sid: str = MEDIA_ACCOUNT_SID) -> str:
        """A Twilio-shaped Media URL on this fake (an unknown `media_sid` is a 404)."""
        message_sid = "MM" + hashlib.sha256(media_sid.encode()).hexdigest()[:32]
        return (
            f"{self.base_url}/2010-04-01/Accounts/{account_sid}"
            f"/Messages/{message_sid}/Media/{media_sid}"
        )

    def media_streamed(self, media_sid: str) -> int:
        with self._lock:
            return self._media[media_sid].streamed

    @property
    def twilio_attempts(self) -> list[str]:
        """Outcome of every Twilio send POST: 'ok', '500', 'error:21610', 'hang'..."""
        return self._snapshot(self._attempts["twilio"])

    @property
    def sendgrid_attempts(self) -> list[str]:
        """Outcome of every SendGrid send POST (same labels as twilio_attempts)."""
        return self._snapshot(self._attempts["sendgrid"])

    @property
    def openai_attempts(self) -> list[str]:
        """Outcome of every chat completion POST (same labels as twilio_attempts)."""
        return self._snapshot(self._attempts["openai"])

    @property
    def openai_max_concurrency(self) -> int:
        """Highest number of chat requests in flight at once since reset()."""
        with self._lock:
            return self._openai_max

    @property
    def openai_in_flight(self) -> int:
        """Chat requests being handled right now."""
        with self._lock:
            return self._openai_now

    # -- configuration -----------------------------------------------------

    def twilio_plan(self, *actions: PlanAction) -> None:
        """Queue answers for the next Twilio send POSTs (then "ok" again)."""
        self._plan("twilio", actions)

    def sendgrid_plan(self, *actions: PlanAction) -> None:
        """Queue answers for the next SendGrid send POSTs (then "ok" again)."""
        self._plan("sendgrid", actions)

    def openai_plan(self, *actions: PlanAction) -> None:
        """Queue answers for the next chat completion POSTs (then "ok" again)."""
        self._plan("openai", actions)

    def _plan(self, provider: Provider, actions: tuple[PlanAction, ...]) -> None:
        parsed = [_parse_action(action) for action in actions]
        with self._lock:
            self._plans[provider].extend(parsed)

    def _next(self, provider: Provider) -> _Planned:
        with self._lock:
            plan = self._plans[provider]
            return plan.popleft() if plan else _OK

    def _attempt(self, provider: Provider, label: str) -> None:
        with self._lock:
            self._attempts[provider].append(label)

    def reset(self) -> None:
        """Forget records, plans and counters; restore openai_reply/openai_delay."""
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._twilio_sent: list[dict[str, Any]] = []
        self._sendgrid_sent: list[dict[str, Any]] = []
        self._openai_requests: list[dict[str, Any]] = []
        self._plans: dict[Provider, deque[_Planned]] = {
            p: deque() for p in ("twilio", "sendgrid", "openai")
        }
        self._attempts: dict[Provider, list[str]] = {
            p: [] for p in ("twilio", "sendgrid", "openai")
        }
        self._media: dict[str, FakeMedia] = {}
        self._media_requests: list[dict[str, Any]] = []
        self._seq = 0
        self._generation += 1
        self._openai_now = self._openai_max = 0
        self._wake_sleepers()
        self.openai_reply: Callable[[dict[str, Any]], str] = default_openai_reply
        self.openai_delay: float = 0.0

    def _wake_sleepers(self) -> None:
        """End every sleeping handler (lock held): a hang left over from one
        test must neither outlive stop() nor count in the next test."""
        old, self._wake = self._wake, asyncio.Event()
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(old.set)

    # -- waiting -----------------------------------------------------------

    def wait_for(
        self, predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01
    ) -> T:
        """Poll ``predicate()`` from the calling thread until truthy; return it."""
        deadline = time.monotonic() + timeout
        while not (result := predicate()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout}s")
            time.sleep(interval)
        return result

    async def wait_for_async(
        self,
        predicate: Callable[[], T],
        timeout: float = 10.0,
        interval: float = 0.01,
    ) -> T:
        """Like wait_for, but yields to the caller's event loop between polls."""
        deadline = time.monotonic() + timeout
        while not (result := predicate()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout}s")
            await asyncio.sleep(interval)
        return result

    # -- app -----------------------------------------------------------------

    def _build_app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(_TWILIO_MESSAGES, self._twilio_messages, methods=["GET", "POST"]),
                Route(_TWILIO_MEDIA, self._twilio_media, methods=["GET"]),
                Route(_MEDIA_CDN, self._media_cdn, methods=["GET"]),
                Route("/v3/mail/send", self._sendgrid_send, methods=["POST"]),
                Route("/v1/chat/completions", self._openai_chat, methods=["POST"]),
            ]
        )

    async def _sleep(self, seconds: float) -> None:
        """Sleep that ends early when the fake stops, so hung handlers answer
        and exit instead of being cancelled (which uvicorn logs as a crash)."""
        wake = self._wake
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(seconds, 0.0)):
                await wake.wait()

    async def _fault(
        self, provider: Provider, planned: _Planned, error_body: ErrorBody
    ) -> Response:
        """Answer a non-"ok" plan action in the provider's error shape."""
        self._attempt(provider, planned.label)
        status, code = planned.status, planned.code
        message = planned.message or _phrase(status)
        if planned.kind == "hang":
            await self._sleep(planned.seconds)
            status, code, message = 504, None, "fake provider: hung request answered late"
        headers = _retry_after_header(planned)
        return JSONResponse(error_body(status, code, message), status_code=status, headers=headers)

    # -- twilio

    async def _twilio_messages(self, request: Request) -> Response:
        sid = request.path_params["sid"]
        auth = _basic_auth(request)
        if auth is None or not (auth[0] == sid or auth[0].startswith("SK")):
            return _twilio_error(401, 20003, "Authenticate")
        if request.method == "GET":
            return self._twilio_list(sid, request)
        return await self._twilio_create(sid, auth, await request.form())

    def _twilio_list(self, sid: str, request: Request) -> Response:
        query = dict(request.query_params)
        records = [r for r in self.twilio_sent if r["account_sid"] == sid]
        try:
            page = _twilio_list_page(sid, query, records)
        except ValueError as exc:
            return _twilio_error(400, 20001, f"Invalid parameter: {exc}")
        return JSONResponse(page)

    async def _twilio_create(self, sid: str, auth: tuple[str, str], form: FormData) -> Response:
        fields = _form_fields(form)
        planned = self._next("twilio")
        if planned.kind not in ("ok", "accept_then_hang"):
            return await self._fault("twilio", planned, _twilio_error_body)
        if problem := _twilio_validate(fields):
            self._attempt("twilio", f"invalid:{problem[0]}")
            return _twilio_error(400, *problem)
        record = self._twilio_accept(sid, auth, fields)
        self._attempt("twilio", planned.label)
        if planned.kind == "accept_then_hang":
            await self._sleep(planned.seconds)
        return JSONResponse(_twilio_message_json(record, listed=False), status_code=201)

    def _twilio_accept(
        self, sid: str, auth: tuple[str, str], fields: dict[str, Any]
    ) -> dict[str, Any]:
        """Store the message: from now on it is 'at Twilio', whatever the client sees."""
        now = time.time()
        record = {
            **fields,
            "sid": "SM" + secrets.token_hex(16),
            "account_sid": sid,
            "date_created": datetime.fromtimestamp(int(now), UTC),
            "time": now,
            "auth": auth,
        }
        with self._lock:
            self._seq += 1
            record["seq"] = self._seq
            self._twilio_sent.append(record)
        return record

    # -- twilio media

    def _media_seen(self, request: Request, outcome: str) -> None:
        with self._lock:
            self._media_requests.append(
                {
                    "path": request.url.path,
                    "auth": _basic_auth(request),
                    "outcome": outcome,
                    "time": time.time(),
                }
            )

    async def _twilio_media(self, request: Request) -> Response:
        auth = _basic_auth(request)
        if auth is None or auth[0] != request.path_params["sid"]:
            self._media_seen(request, "unauthorized")
            return _twilio_error(401, 20003, "Authenticate")
        media_sid = request.path_params["media_sid"]
        with self._lock:
            item = self._media.get(media_sid)
            failure = item.failures.pop(0) if item and item.failures else None
        if item is None or failure == 404:
            self._media_seen(request, "404")
            return _twilio_error(
                404, 20404, f"The requested resource {request.url.path} was not found"
            )
        if failure is not None:
            self._media_seen(request, str(failure))
            return _twilio_error(failure, 20500, _phrase(failure))
        self._media_seen(request, "redirect")
        return RedirectResponse(_MEDIA_CDN.format(media_sid=media_sid), status_code=307)

    async def _media_cdn(self, request: Request) -> Response:
        media_sid = request.path_params["media_sid"]
        with self._lock:
            item = self._media.get(media_sid)
            slow = item is not None and item.slow_times > 0
            if item is not None and slow:
                item.slow_times -= 1
        if item is None:
            self._media_seen(request, "404")
            return Response(status_code=404)
        if slow:
            await self._sleep(item.slow_s)
        if item.stream_bytes is None:
            self._media_seen(request, "ok")
            return Response(item.content, media_type=item.content_type)
        self._media_seen(request, "streamed")
        headers = {"Content-Length": str(item.stream_bytes)} if item.declare_length else {}
        return StreamingResponse(
            self._stream(item, request), media_type=item.content_type, headers=headers
        )

    async def _stream(self, item: FakeMedia, request: Request) -> Any:
        """`item.stream_bytes` bytes in chunks, counting what was written until the client
        hung up (uvicorn's flow control holds each write until the socket takes it)."""
        assert item.stream_bytes is not None
        chunk = b"\xff" * _MEDIA_CHUNK
        while item.streamed < item.stream_bytes and not await request.is_disconnected():
            size = min(_MEDIA_CHUNK, item.stream_bytes - item.streamed)
            yield chunk[:size]
            with self._lock:
                item.streamed += size

    # -- sendgrid

    async def _sendgrid_send(self, request: Request) -> Response:
        if _bearer(request) is None:
            return _sendgrid_error(
                401, "The provided authorization grant is invalid, expired, or revoked"
            )
        try:
            body = await request.json()
        except ValueError:
            return _sendgrid_error(400, "Bad Request")
        planned = self._next("sendgrid")
        if planned.kind not in ("ok", "accept_then_hang"):
            return await self._fault("sendgrid", planned, _sendgrid_error_body)
        if problem := _sendgrid_validate(body):
            self._attempt("sendgrid", f"invalid:{problem[0]}")
            return _sendgrid_error(400, problem[1], problem[0] or None)
        message_id = self._sendgrid_accept(body, request)
        self._attempt("sendgrid", planned.label)
        if planned.kind == "accept_then_hang":
            await self._sleep(planned.seconds)
        return Response(status_code=202, headers={"X-Message-Id": message_id})

    def _sendgrid_accept(self, body: dict[str, Any], request: Request) -> str:
        """Store the mail and return the X-Message-Id SendGrid would assign."""
        message_id = secrets.token_urlsafe(16)
        record = {
            "json": body,
            "headers": dict(request.headers),
            "message_id": message_id,
            "time": time.time(),
        }
        with self._lock:
            self._sendgrid_sent.append(record)
        return message_id

    # -- openai

    async def _openai_chat(self, request: Request) -> Response:
        with self._lock:
            generation = self._generation
            self._openai_now += 1
            self._openai_max = max(self._openai_max, self._openai_now)
        try:
            return await self._openai_answer(request)
        finally:
            with self._lock:
                if generation == self._generation:  # else reset() already zeroed it
                    self._openai_now -= 1

    async def _openai_answer(self, request: Request) -> Response:
        if _bearer(request) is None:
            return _openai_error(401, "You didn't provide an API key.", "invalid_api_key")
        try:
            body = await request.json()
        except ValueError:
            return _openai_error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict) or not body.get("model") or not body.get("messages"):
            return _openai_error(400, "'model' and a non-empty 'messages' are required.")
        if body.get("stream"):
            return _openai_error(400, "fake provider: stream=True is not supported")
        planned = self._next("openai")
        if planned.kind not in ("ok", "accept_then_hang"):
            return await self._fault("openai", planned, _openai_error_body)
        with self._lock:
            self._openai_requests.append(body)
            self._attempts["openai"].append(planned.label)
        await self._sleep(self.openai_delay + planned.seconds)
        return self._openai_reply(body)

    def _openai_reply(self, body: dict[str, Any]) -> Response:
        """Build the reply; a broken override shows up as a readable 500."""
        try:
            reply = self.openai_reply(body)
        except Exception as exc:  # noqa: BLE001 -- surface test bugs to the client
            return JSONResponse(
                _openai_error_body(500, None, f"openai_reply raised {exc!r}"), status_code=500
            )
        return JSONResponse(_chat_completion(body, reply))
