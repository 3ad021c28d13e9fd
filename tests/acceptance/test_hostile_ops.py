"""Odd and hostile requests outside the message content (SPEC §9): malformed operator API calls
are a 4xx and one warning line; webhook paths with a trailing slash are answered, never
redirected; request headers over 64 KiB get 431 at once from a real `parley serve`; a worker on
a host with a 253-character name still claims and answers; reads never wait for SQLite's write
lock."""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.routing import Route

from service.assistant import create_model
from service.channels.registry import build_channels
from service.models import Conversation, ReplyJob
from service.queue.worker import Worker, worker_id
from service.reply.flow import ReplyContext
from tests.acceptance.test_hostile_twilio import make_unavailable
from tests.conftest import PUBLIC_BASE_URL, SettingsFactory, running_app
from tests.fakes import FakeProviders
from tests.helpers import (
    conversations,
    eventually,
    form_of,
    jobs,
    messages,
    post_twilio,
    recorded_body,
    recording,
    settled,
    twilio_form,
)
from tests.processes import parley_env, serving

ADMIN_TOKEN = "admin-hostile-3c1d9e7f5a"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JSON = {"Content-Type": "application/json"}
TEXTER = "+15550001111"
FAST: dict[str, Any] = {"worker_poll_s": 0.05, "reply_retry_base_s": 0.05}
HUGE = "9" * 5000


def refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Parley's log records at WARNING or above."""
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def assert_one_clean_warning(caplog: pytest.LogCaptureFixture) -> None:
    records = refusals(caplog)
    assert [r.levelname for r in records] == ["WARNING"], [r.getMessage() for r in records]
    assert records[0].exc_info is None and "Traceback" not in caplog.text


# ---------------------------------------------------------------- the operator API


@pytest.fixture
async def api(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(make_settings(admin_token=ADMIN_TOKEN, **FAST)) as client:
        response = await post_twilio(client, twilio_form(Body="hi", From=TEXTER))
        assert response.status_code == 200
        await eventually(lambda: settled(engine))
        yield client


MALFORMED_QUERIES = [
    f"page={HUGE}",
    f"page_size={HUGE}",
    f"page=1&page_size={HUGE}",
    "page=-3",
    "page=1.5",
    "page=1e3",
    "page=0x10",
    "page=%ff",
    "page=%00",
    "page=%D9%A3",  # an Arabic-Indic digit: `str.isdigit` says yes, `int` would accept it
    "page= 1",
    "page_size=%2B5",
]


@pytest.mark.parametrize("query", MALFORMED_QUERIES)
async def test_malformed_pages_are_400_with_one_warning(
    api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, query: str
) -> None:
    caplog.clear()
    response = await api.get(f"/api/conversations?{query}", headers=AUTH)

    assert response.status_code == 400, response.text
    assert "page" in response.json()["error"]
    assert len(response.text) < 500  # the huge value is not echoed back whole
    assert_one_clean_warning(caplog)


MALFORMED_IDS = [HUGE, "0" * 5000 + "x", "abc", "-1", "1.5", "1e3", "0x1", "%ff", "0", " 1"]


@pytest.mark.parametrize("bad_id", MALFORMED_IDS)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/conversations/{id}"),
        ("DELETE", "/api/conversations/{id}"),
        ("POST", "/api/conversations/{id}/pause"),
        ("POST", "/api/conversations/{id}/resume"),
        ("POST", "/api/conversations/{id}/messages"),
    ],
)
async def test_malformed_ids_are_404_with_one_warning_and_change_nothing(
    api: httpx.AsyncClient,
    engine: AsyncEngine,
    providers: FakeProviders,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    bad_id: str,
) -> None:
    caplog.clear()
    response = await api.request(
        method, path.format(id=bad_id), headers=AUTH, json={"body": "operator text"}
    )

    assert response.status_code == 404, response.text
    assert "no conversation" in response.json()["error"]
    assert_one_clean_warning(caplog)
    [conversation] = await conversations(engine)
    assert not conversation.paused and len(await messages(engine)) == 2
    assert len(providers.twilio_sent) == 1


MALFORMED_BODIES: list[tuple[str, bytes, dict[str, str], int]] = [
    ("100,000 [ (over the size limit)", b"[" * 100_000, JSON, 413),
    ("60,000 [", b"[" * 60_000, JSON, 400),
    ('10,000 {"a":', b'{"a":' * 10_000, JSON, 400),
    ("nested inside the body field", b'{"body": ' + b"[" * 20_000, JSON, 400),
    ("a JSON string", b'"just text"', JSON, 400),
    ("a JSON array", b'[{"body": "x"}]', JSON, 400),
    ("JSON null", b"null", JSON, 400),
    ("a 5000-digit number", b'{"body": ' + HUGE.encode() + b"}", JSON, 400),
    ("invalid UTF-8", b'{"body": "\xff\xfe"}', JSON, 400),
    ("a lone surrogate escape", b'{"body": "\\ud800"}', JSON, 422),
    ("an empty body", b"", JSON, 400),
    ("text/plain", b'{"body": "hello"}', {"Content-Type": "text/plain"}, 400),
    ("a form", b"body=hello", {"Content-Type": "application/x-www-form-urlencoded"}, 400),
    ("no content type", b'{"body": "hello"}', {}, 400),
    ("over 64 KiB", b'{"body": "' + b"a" * 70_000 + b'"}', JSON, 413),
    ("a body that is not text", b'{"body": 1e400}', JSON, 422),
]


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [case[1:] for case in MALFORMED_BODIES],
    ids=[case[0] for case in MALFORMED_BODIES],
)
async def test_malformed_operator_bodies_are_4xx_with_one_warning_and_send_nothing(
    api: httpx.AsyncClient,
    engine: AsyncEngine,
    providers: FakeProviders,
    caplog: pytest.LogCaptureFixture,
    content: bytes,
    headers: dict[str, str],
    status: int,
) -> None:
    [conversation] = await conversations(engine)
    caplog.clear()
    response = await api.post(
        f"/api/conversations/{conversation.id}/messages",
        headers={**AUTH, **headers},
        content=content,
    )

    assert response.status_code == status, response.text
    assert response.json()["error"]
    assert_one_clean_warning(caplog)
    await asyncio.sleep(0.05)
    assert len(await messages(engine)) == 2 and len(providers.twilio_sent) == 1


async def test_a_json_body_with_a_charset_is_accepted(
    api: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    [conversation] = await conversations(engine)
    response = await api.post(
        f"/api/conversations/{conversation.id}/messages",
        headers={**AUTH, "Content-Type": "application/json; charset=utf-8"},
        content=b'{"body": "a human here"}',
    )

    assert response.status_code == 202, response.text
    await providers.wait_for_async(lambda: len(providers.twilio_sent) == 2)
    assert providers.twilio_sent[1]["Body"] == "a human here"


async def test_unknown_api_paths_are_json_404_never_a_redirect(
    api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    for path in ("/api/conversations/", "/api/nothing", "/api/conversations/1/pause/"):
        caplog.clear()
        response = await api.get(path, headers=AUTH)
        assert response.status_code == 404, path
        assert response.json()["error"]
        assert_one_clean_warning(caplog)


async def test_refused_tokens_are_one_warning_without_the_token(
    api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    response = await api.get(
        "/api/conversations", headers={"Authorization": "Bearer guessed-token-77"}
    )

    assert response.status_code == 401
    assert_one_clean_warning(caplog)
    assert "guessed-token-77" not in caplog.text


# ---------------------------------------------------------------- no redirects


def webhook_paths(client: httpx.AsyncClient) -> list[str]:
    """Every webhook path the app serves, without its trailing-slash twin."""
    app: Any = client.app  # type: ignore[attr-defined]
    paths = {r.path.rstrip("/") for r in app.routes if isinstance(r, Route)}
    return sorted(p for p in paths if p.startswith("/webhooks/"))


async def deliver(client: httpx.AsyncClient, path: str, signed_for: str) -> httpx.Response:
    """A well-formed, correctly authenticated request to the webhook at `path`, signed (for
    Twilio) for the URL `signed_for`."""
    if path.startswith("/webhooks/sendgrid/"):
        data = recording("sendgrid/gmail_first.json")
        headers = {k: v for k, v in data["headers"].items() if k.lower() != "content-length"}
        fresh = f"<{secrets.token_hex(8)}@mail.gmail.com>".encode()  # not a redelivery
        body = recorded_body(data).replace(b"<CAF=first-alice@mail.gmail.com>", fresh)
        return await client.post(path, headers=headers, content=body)
    if path.rstrip("/").endswith("/status"):
        form = form_of("twilio/status_delivered.json")
    else:
        form = twilio_form(From=TEXTER)
    return await post_twilio(client, form, path=path, signed_url=PUBLIC_BASE_URL + signed_for)


async def test_every_webhook_path_with_a_trailing_slash_is_handled_never_redirected(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    paths = webhook_paths(client)
    assert {"/webhooks/twilio/sms", "/webhooks/twilio/status", "/webhooks/sendgrid/inbound"} <= set(
        paths
    )

    for path in paths:
        plain = await deliver(client, path, path)
        slashed = await deliver(client, path + "/", path + "/")
        assert 200 <= plain.status_code < 300, (path, plain.status_code, plain.text)
        assert slashed.status_code == plain.status_code, (path, slashed.text)
        assert "location" not in slashed.headers
    await eventually(lambda: settled(engine))
    stored = [m for m in await messages(engine) if m.sender == "user"]
    assert len(stored) == 2 * sum(1 for p in paths if not p.endswith("/status"))


async def test_twilio_signatures_are_checked_against_the_url_requested(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    for path in (p for p in webhook_paths(client) if p.startswith("/webhooks/twilio/")):
        # Signed for the path without the slash, sent to the one with it: not what was signed.
        assert (await deliver(client, path + "/", path)).status_code == 403, path
        assert (await deliver(client, path, path + "/")).status_code == 403, path
    assert await messages(engine) == []


async def test_other_paths_with_a_trailing_slash_are_404_never_3xx(
    client: httpx.AsyncClient,
) -> None:
    for method, path in [
        ("GET", "/healthz/"),
        ("GET", "/metrics/"),
        ("GET", "/api/"),
        ("GET", "/api"),
        ("POST", "/webhooks/twilio/sms//"),
        ("POST", "/webhooks/"),
    ]:
        response = await client.request(method, path)
        assert response.status_code == 404, (method, path, response.status_code)


# ---------------------------------------------------------------- request headers, real process


def exchange(port: int, data: bytes, pause_after: int | None = None) -> tuple[bytes, float]:
    """Send `data` on a fresh connection while reading the answer; the answer's first 4 KiB and
    the seconds until they came. With `pause_after`, the first that many bytes go in a read of
    their own (a short pause, so the server reads them apart from the rest)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    answer: dict[str, Any] = {}
    started = time.perf_counter()

    def read() -> None:
        chunks = b""
        try:
            while b"\r\n\r\n" not in chunks and len(chunks) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                chunks += chunk
        except OSError as exc:
            chunks += f"<{exc!r}>".encode()
        answer["data"], answer["seconds"] = chunks, time.perf_counter() - started

    reader = threading.Thread(target=read)
    reader.start()
    try:
        if pause_after is not None:
            sock.sendall(data[:pause_after])
            time.sleep(0.2)
            data = data[pause_after:]
        sock.sendall(data)
    except OSError:
        pass  # the server closed early: its answer is what counts
    reader.join(30)
    sock.close()
    return answer["data"], answer["seconds"]


def head(size: int, line_size: int = 4000, request: bytes = b"GET /healthz") -> bytes:
    """A request head of about `size` bytes of headers."""
    lines = [b"X-Pad-%d: %s\r\n" % (i, b"a" * line_size) for i in range(size // line_size)]
    return request + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(lines)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("headers")
    env = parley_env(DATABASE_URL=f"sqlite+aiosqlite:///{folder}/p.db", PARLEY_DEV="1")
    with serving(env, folder) as (port, _process):
        yield port, folder / "serve.log"


def test_headers_under_64_kib_are_served(server: Any) -> None:
    port, _ = server
    answer, _ = exchange(port, head(60_000) + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]


@pytest.mark.parametrize(
    ("name", "request_head"),
    [
        ("70 KB of headers", head(70_000) + b"\r\n"),
        ("1 MB of headers", head(1_000_000) + b"\r\n"),
        ("one 32 MB header", b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 32_000_000 + b"\r\n\r\n"),
        ("32 MB of headers, never ending", head(32_000_000)),
    ],
)
def test_headers_over_64_kib_are_431_at_once_and_logged_once(
    server: Any, name: str, request_head: bytes
) -> None:
    port, log = server
    before = log.read_text().count("status=431")

    answer, seconds = exchange(port, request_head)

    status_line = answer.split(b"\r\n", 1)[0]
    print(f"{name}: {status_line!r} after {seconds * 1000:.1f} ms")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert seconds < 1.0  # measured: ~2 ms; before: 200 after 1.3 s for one 32 MB header
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    text = log.read_text()
    assert text.count("status=431") == before + 1
    assert "Traceback" not in text


def test_a_large_body_after_small_headers_is_not_mistaken_for_headers(server: Any) -> None:
    port, _ = server
    body = b"x" * 600_000
    request = head(2_000) + b"Content-Length: %d\r\n\r\n" % len(body) + body
    answer, _ = exchange(port, request)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    # The empty line that ends the head split across two reads: still found.
    small = head(60_000) + b"Content-Length: %d\r\n\r\n" % len(body)
    answer, _ = exchange(port, small + body, pause_after=len(small) - 2)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]


def test_keep_alive_requests_are_counted_each_on_its_own(server: Any) -> None:
    port, _ = server
    one = head(40_000) + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(3):  # 120 KB of headers on one connection, 40 KB per request
            sock.sendall(one)
            answer = b""
            while not answer.endswith(b'{"status":"ok"}'):
                chunk = sock.recv(4096)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:100]


# ---------------------------------------------------------------- lease owner


async def test_a_worker_on_a_host_with_a_253_character_name_answers(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    host = "parley-worker-" + "k" * 229 + "-7d9f8b6c4"
    assert len(host) == 253
    settings = make_settings(embedded_worker=False, **FAST)
    async with running_app(settings) as client:
        assert (await post_twilio(client, twilio_form(Body="hi", From=TEXTER))).status_code == 200
    channels = build_channels(settings)
    model = create_model(settings)
    worker = Worker(ReplyContext(engine, settings, model, channels), owner=worker_id(host=host))
    running = asyncio.create_task(worker.run())
    try:
        await providers.wait_for_async(lambda: len(providers.twilio_sent) == 1)
    finally:
        await worker.stop()
        await running
        for channel in channels.values():
            await channel.close()
        await model.close()

    assert providers.twilio_sent[0]["To"] == TEXTER
    assert [j.status for j in await jobs(engine)] == ["done"]
    owner = worker.queue.owner
    limit = ReplyJob.__table__.c.lease_owner.type.length  # type: ignore[attr-defined]
    print(f"lease owner ({len(owner)} characters): {owner}")
    assert len(owner) <= limit and owner.startswith("parley-worker-kkk")


def test_worker_ids_stay_readable_and_distinct() -> None:
    short = worker_id(host="laptop")
    assert short.startswith("laptop:") and short.split(":")[1].isdigit()
    twins = [worker_id(host="p" * 250 + suffix) for suffix in ("abc", "abd")]
    assert all(len(t) <= 64 and t.startswith("ppp") for t in twins)
    assert twins[0].split(":")[0] != twins[1].split(":")[0]  # the digest tells them apart


# ---------------------------------------------------------------- reads and SQLite's write lock


def sqlite_path(database_url: str) -> str:
    database = make_url(database_url).database
    assert database
    return database


async def test_reads_answer_while_another_connection_holds_the_write_lock(
    make_settings: SettingsFactory, engine: AsyncEngine, database_url: str
) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite's write lock; PostgreSQL readers never wait for writers")
    async with running_app(make_settings(admin_token=ADMIN_TOKEN, **FAST)) as client:
        assert (await post_twilio(client, twilio_form(Body="hi", From=TEXTER))).status_code == 200
        await eventually(lambda: settled(engine))
        [conversation] = await conversations(engine, Conversation.remote_address == TEXTER)
        reads = [
            ("/healthz", {}),
            ("/metrics", {}),
            (f"/c/{conversation.conversation_url}", {}),
            ("/api/conversations", AUTH),
            (f"/api/conversations/{conversation.id}", AUTH),
        ]
        # In a thread: waiting on the loop's thread for the lock would also stall the app's
        # own transaction that holds it (it needs the loop to commit): a deadlock, until
        # sqlite3's busy timeout said "database is locked" (seen once on a loaded machine).
        holder = sqlite3.connect(
            sqlite_path(database_url), isolation_level=None, check_same_thread=False, timeout=30
        )
        await asyncio.to_thread(holder.execute, "BEGIN IMMEDIATE")
        holder.execute("UPDATE conversation SET paused = paused")  # the write lock is held
        try:
            for path, headers in reads:
                started = time.perf_counter()
                response = await client.get(path, headers=headers)
                seconds = time.perf_counter() - started
                print(f"{path.split('/')[1]} with the write lock held: {seconds * 1000:.0f} ms")
                assert response.status_code == 200, (path, response.text)
                assert seconds < 2.0, path  # measured ~20 ms; before: 10 s, then 503
            # A write still waits for the lock (BEGIN IMMEDIATE), then succeeds.
            webhook = asyncio.create_task(
                post_twilio(client, twilio_form(Body="while locked", From=TEXTER))
            )
            await asyncio.sleep(0.3)
            assert not webhook.done()
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert (await webhook).status_code == 200


@pytest.mark.parametrize("path", ["/api/conversations", "/api/conversations/1", "/c/" + "a" * 43])
async def test_while_the_database_is_unavailable_reads_are_503_with_one_warning(
    make_settings: SettingsFactory,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    away = await make_unavailable(database_url)
    settings = make_settings(admin_token=ADMIN_TOKEN, embedded_worker=False, database_url=away)
    async with running_app(settings) as client:
        caplog.clear()
        response = await client.get(path, headers=AUTH)

    assert response.status_code == 503
    assert "the database is unavailable" in response.text
    assert_one_clean_warning(caplog)
