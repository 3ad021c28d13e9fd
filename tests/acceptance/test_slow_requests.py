"""Requests that arrive slowly (slowloris), against the app under a real uvicorn on 127.0.0.1
with Parley's protocol: half a head, a body that stops, a connection that sends nothing. Each
is refused or closed at its deadline with one warning line and nothing stored, while a request
that has arrived is answered however long the app takes. The deadlines are shortened here
(10 s and 60 s in production). Both databases."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator

import pytest
import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from service.models import Message
from service.types import Channel
from service.web import protocol
from service.web.app import create_app
from service.web.protocol import BoundedHeadProtocol
from tests.conftest import SettingsFactory
from tests.email_posts import HOSTILE, raw_post, request_of
from tests.helpers import eventually, messages, one_warning

DEADLINE_S = 0.5


@pytest.fixture
async def served(
    make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[int, Starlette]]:
    monkeypatch.setattr(protocol, "HEAD_TIMEOUT_S", DEADLINE_S)
    monkeypatch.setattr(protocol, "BODY_TIMEOUT_S", DEADLINE_S)
    monkeypatch.setattr(protocol, "WRITE_TIMEOUT_S", DEADLINE_S)
    app = create_app(make_settings(worker_poll_s=0.05))
    listening = socket.create_server(("127.0.0.1", 0))
    # Small send buffers (the accepted sockets inherit them): answers nobody reads fill them
    # after a few, not after megabytes.
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=listening.getsockname()[1],
        log_config=None,
        access_log=False,
        lifespan="on",
        http=BoundedHeadProtocol,
        timeout_graceful_shutdown=2,  # a connection left open must not hold the test
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listening]))

    async def started() -> bool:
        return server.started

    await eventually(started, timeout=30, interval=0.01)
    yield config.port, app
    server.should_exit = True
    await serving
    listening.close()


@pytest.fixture
def port(served: tuple[int, Starlette]) -> int:
    return served[0]


async def send_then_wait(port: int, data: bytes) -> tuple[bytes, float]:
    """Send `data`, then nothing; returns what came back before the server closed, and when."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    answer = b""
    with contextlib.suppress(ConnectionResetError):  # closed with our bytes unread: a reset
        writer.write(data)
        await writer.drain()
        while chunk := await asyncio.wait_for(reader.read(65536), timeout=DEADLINE_S * 10):
            answer += chunk
    seconds = time.perf_counter() - started
    writer.close()
    return answer, seconds


def inbound_head(headers: dict[str, str]) -> bytes:
    """An Inbound Parse request's head with these headers, as raw HTTP/1.1, without its
    framing (Content-Length or Transfer-Encoding) and its closing empty line."""
    return b"POST /webhooks/sendgrid/inbound HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(
        b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in headers.items()
    )


def slow_mail(message_id: str, extra_headers: bytes = b"") -> bytes:
    """A whole Inbound Parse request whose mail keeps an extraction child busy until its 1 s
    deadline (twice the deadlines here), as raw HTTP/1.1."""
    _, build = next(h for h in HOSTILE if h[0].startswith("mime: 19 levels"))
    headers, body = request_of(build(message_id))
    head = inbound_head(headers)
    return head + b"Content-Length: %d\r\n%s\r\n" % (len(body), extra_headers) + body


async def test_half_a_head_then_nothing_is_408_at_the_deadline_with_one_warning(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    answer, seconds = await send_then_wait(
        port, b"POST /webhooks/twilio/sms HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    )

    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert DEADLINE_S * 0.9 < seconds < DEADLINE_S * 4
    [line] = [r for r in caplog.records if r.levelno >= logging.WARNING]  # one line in all
    assert "refused: its headers did not arrive" in line.getMessage() and line.exc_info is None
    assert "status=408" in line.getMessage()


async def test_a_body_that_stops_is_cut_at_the_deadline_and_nothing_is_stored(
    port: int, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    head = (
        b"POST /webhooks/twilio/sms HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
    )
    answer, seconds = await send_then_wait(port, head + b"Body=hello&From=%2B1555")

    assert not answer.startswith(b"HTTP/1.1 200"), answer[:100]
    assert DEADLINE_S * 0.9 < seconds < DEADLINE_S * 4
    [line] = [r for r in caplog.records if r.levelno >= logging.WARNING]  # one line in all
    assert "refused: its body did not arrive" in line.getMessage() and line.exc_info is None
    assert "status=408" in line.getMessage()
    assert await messages(engine) == []


async def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    answer, seconds = await send_then_wait(port, b"")

    assert answer == b""
    assert DEADLINE_S * 0.9 < seconds < DEADLINE_S * 4
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []  # no request


async def test_a_request_that_has_arrived_is_answered_however_long_the_app_takes(
    port: int, engine: AsyncEngine
) -> None:
    # A mail kept at work until the extraction's 1 s deadline, twice the deadlines here.
    request = slow_mail("<slow-arrived@example.com>", b"Connection: close\r\n")

    answer, seconds = await send_then_wait(port, request)

    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert seconds > DEADLINE_S * 1.5  # it took longer than the deadlines, and was answered
    [stored] = await messages(engine, Message.provider_message_id == "<slow-arrived@example.com>")
    assert stored.intent == "unreadable"


async def test_an_early_answer_then_the_body_then_nothing_is_closed_at_the_deadline(
    port: int,
) -> None:
    # A 404 answered before the body was read; the body then comes, then nothing: uvicorn's
    # keep-alive timer was stopped by those bytes, so only this deadline closes it.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), timeout=5)
    assert answer.startswith(b"HTTP/1.1 404"), answer[:100]
    writer.write(b"hello")
    await writer.drain()
    started = time.perf_counter()
    rest = await asyncio.wait_for(reader.read(), timeout=DEADLINE_S * 8)  # until closed
    seconds = time.perf_counter() - started
    writer.close()
    assert rest == b"" and seconds < DEADLINE_S * 4  # uvicorn's keep-alive would be 5 s


async def test_a_pipelined_request_waits_for_the_answer_before_it_and_never_cuts_it(
    port: int, engine: AsyncEngine
) -> None:
    # Request 1 has arrived and takes ~1 s to answer (twice the deadlines); request 2's head
    # stops halfway. Request 1 gets its 200 first; request 2 its 408 after it.
    first = slow_mail("<slow-pipelined@example.com>")
    second = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"

    answer, _ = await send_then_wait(port, first + second)

    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 408" in answer, answer[:400]
    [stored] = await messages(engine, Message.provider_message_id == "<slow-pipelined@example.com>")
    assert stored.intent == "unreadable"


async def test_a_head_sent_in_pieces_within_the_deadline_is_served(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for piece in (
        b"GET /hea",
        b"lthz HTTP/1.1\r\nHo",
        b"st: 127.0.0.1\r\nConnection: close\r\n\r\n",
    ):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(DEADLINE_S / 5)
    answer = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]


async def test_a_connection_pipelining_past_the_cap_is_closed_with_one_line(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Thousands of requests in one send used to be queued whole (8 MB pipelined: 270 MB held).
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    answer, seconds = await send_then_wait(port, request * 5000 + b"GARBAGE\x00\r\n\r\n")

    assert answer.count(b"HTTP/1.1 200") <= protocol.MAX_PIPELINED + 1 and seconds < 3
    expected = f"connection closed: more than {protocol.MAX_PIPELINED} pipelined requests waiting"
    assert one_warning(caplog.records, expected) == expected
    again, _ = await send_then_wait(
        port, request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    )
    assert again.startswith(b"HTTP/1.1 200")


async def test_answers_the_client_never_reads_close_the_connection_at_the_deadline(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Paced under the pipelining cap, reading nothing: the answers fill the socket buffers,
    # and the connection used to stay open forever.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    started, closed = time.perf_counter(), False
    while time.perf_counter() - started < 20 and not closed:
        try:
            sock.send(request)
        except BlockingIOError:
            pass
        except OSError:
            closed = True
        await asyncio.sleep(0.02)
    sock.close()
    assert closed
    expected = f"connection closed: its answers were not read for {DEADLINE_S:g} s"
    assert one_warning(caplog.records, expected) == expected


async def test_a_big_mail_waiting_its_turn_is_not_cut_by_the_body_deadline(
    served: tuple[int, Starlette], engine: AsyncEngine
) -> None:
    # Its turn comes after three body deadlines: the client was never late, the app was.
    port, app = served
    email = app.state.channels[Channel.EMAIL]
    attached = {"Content-Type": 'multipart/mixed; boundary="b1"'}
    photo = base64.encodebytes(bytes(range(256)) * 8 * 1024)  # 2.8 MB: past the small mails
    body = b"--b1\r\nContent-Type: text/plain\r\n\r\nMy turn.\r\n--b1\r\n" + photo + b"--b1--\r\n"
    headers, form = request_of(raw_post("<waited@example.com>", attached, body))
    head = inbound_head(headers)
    request = head + b"Content-Length: %d\r\n\r\n" % len(form) + form
    async with email.budget.held(email.budget.capacity):
        sending = asyncio.create_task(send_then_wait(port, request))
        await asyncio.sleep(DEADLINE_S * 3)
        assert not sending.done() and email.budget.waiting == 1
    answer, _ = await sending
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    [stored] = await messages(engine, Message.provider_message_id == "<waited@example.com>")
    assert stored.body == "My turn."


async def test_a_body_that_turns_invalid_midway_is_one_line_and_nothing_stored(
    port: int, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    # uvicorn's own "Invalid HTTP request received." and then the app's line for its broken
    # read were two lines for one bad request.
    headers, _ = request_of(raw_post("<broken@example.com>", {}, b"Hello\r\n"))
    head = inbound_head(headers)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n4\r\n--xY\r\n")
    await writer.drain()
    await asyncio.sleep(DEADLINE_S / 5)  # the app is reading the body
    writer.write(b"zz\r\nnot a chunk size\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()

    line = one_warning(caplog.records, "its body is not valid HTTP/1.1")
    assert line.endswith("status=400")
    assert await messages(engine) == []


async def test_a_head_of_thousands_of_tiny_headers_is_refused_at_the_hundred_and_first(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    # 64 KiB of `a:` lines was 15,800 headers: 1.9 MB held and 8 ms of loop a connection.
    head = b"POST /webhooks/twilio/sms HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"a:\r\n" * 15_000
    answer, seconds = await send_then_wait(port, head + b"Content-Length: 100\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    assert seconds < 3
    expected = f"request refused: more than {protocol.MAX_HEADERS} headers status=431"
    assert one_warning(caplog.records, expected) == expected


async def test_bursts_that_fill_the_apps_buffer_do_not_restart_the_body_deadline(
    port: int, engine: AsyncEngine
) -> None:
    # Each burst over uvicorn's 64 KiB buffer paused reading until the app took it; a clock
    # that started over on every resume kept such a slow upload open forever.
    headers, body = request_of(raw_post("<bursts@example.com>", {}, b"x" * 2_000_000))
    head = inbound_head(headers)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body))
    started, closed_after = time.perf_counter(), None
    for offset in range(0, len(body), 100_000):
        try:
            writer.write(body[offset : offset + 100_000])
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(DEADLINE_S * 0.6)
        if reader.at_eof() or writer.is_closing():
            break
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(reader.read(), timeout=DEADLINE_S * 4)
    closed_after = time.perf_counter() - started
    writer.close()

    assert closed_after < DEADLINE_S * 4, closed_after  # 20 bursts would take 6 s
    assert await messages(engine) == []


async def test_a_bad_request_pipelined_behind_an_answer_leaves_that_answer_whole(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    # uvicorn wrote its 400 as if it were the earlier request's answer, and cut that answer.
    first = slow_mail("<before-a-bad-one@example.com>")
    bad = (
        b"POST /webhooks/twilio/sms HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n"
    )

    answer, _ = await send_then_wait(port, first + bad)

    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1 ") == 1, answer[:300]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    refusals = [line for line in lines if "refused" in line]
    assert len(refusals) == 1 and "a pipelined request is not valid HTTP/1.1" in refusals[0]


async def test_trailers_past_the_header_cap_are_one_line_from_the_app(
    port: int, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    headers, _ = request_of(raw_post("<trailers@example.com>", {}, b"Hello\r\n"))
    head = inbound_head(headers)
    trailers = b"".join(b"t%d: x\r\n" % n for n in range(150))
    answer, _ = await send_then_wait(
        port, head + b"Transfer-Encoding: chunked\r\n\r\n4\r\n--xY\r\n0\r\n" + trailers + b"\r\n"
    )

    one_warning(caplog.records, "more than 100 headers status=431")
    assert b"HTTP/1.1 200" not in answer
    assert await messages(engine) == []
