"""uvicorn's HTTP protocol (httptools) with bounds on the request head: its size and, with
its body, the time it takes to arrive.

httptools accepts headers of any size and joins a long header value piece by piece (32 MB in
one header took 1.3 s of event loop). Here the bytes of each request head are counted as they
arrive, before the parser sees them: past `MAX_HEAD_BYTES` the request is answered `431` at
most one socket read (256 KiB) after the limit. The connection is then half-closed and what the
client still sends is read and dropped for `LINGER_S`: closing at once, with unread bytes,
would reset the connection and a client still sending could lose the 431.

Counting stops where the head ends (the first empty line), so a body arriving in the same read
is never counted. A head that starts inside the read that completed the previous request
(pipelining) is counted from the next read on: it may pass the limit by that read, never be
refused below it.

Time. uvicorn bounds the wait between requests (its keep-alive timeout) but not a request that
arrives slowly: a client that sent half a head, or a body's first bytes, and then nothing, held
its connection (and a file descriptor) forever, and a thousand of them made every other
connection fail once the process ran out of descriptors. Here a request's head must arrive
within `HEAD_TIMEOUT_S` of its first byte (or of the connection, or of the previous response,
when nothing comes), and its body within `BODY_TIMEOUT_S` of the head; past either the request
is refused (`408` while in the head, the connection closed once the app has the request:
its body read then sees a disconnect). A request that has arrived is never timed here, however
long the app takes to answer it.

Pipelining and answers nobody reads. uvicorn parses every request in a socket read (256 KiB:
thousands of small ones) and queues each behind the answer in progress, resuming reads after
every answer: one connection that pipelined 8 MB and read nothing held 270 MB. Here a
connection with `MAX_PIPELINED` requests already waiting is closed, its later requests never
queued; and an answer the client does not read for `WRITE_TIMEOUT_S` (the socket's buffers
full) closes the connection, which otherwise stayed open forever. uvicorn marks only the
newest request of a closed connection as disconnected, so an earlier one still being answered
wrote to the closed socket (a traceback under uvloop); here every request being answered is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
# Header lines in one request head. uvicorn keeps each as Python objects (~120 bytes apiece):
# 64 KiB of `a:` lines was 15,800 headers, 1.9 MB and 8 ms of event loop a connection.
MAX_HEADERS = 100
HEAD_TIMEOUT_S = 10.0  # Twilio and SendGrid send a head in one go
BODY_TIMEOUT_S = 60.0  # SendGrid's 30 MB at 0.5 MB/s
LINGER_S = 1.0
MAX_PIPELINED = 8  # requests queued behind the answer in progress (Twilio and SendGrid: none)
WRITE_TIMEOUT_S = 30.0  # an answer of a few hundred bytes that the client has not read
CUT = "parley.cut"  # the scope's key for why the protocol cut a request's body: (status, why)
_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")
_CARRY = 3  # a head end split across two reads is still found
_REFUSAL_BODY = b"request headers over 64 KiB\n"
_TIMEOUT_BODY = b"request not received in time\n"


def _refusal(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 %s\r\n"
        b"content-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\n"
        b"connection: close\r\n"
        b"\r\n%s"
    ) % (status, len(body), body)


_REFUSAL = _refusal(b"431 Request Header Fields Too Large", _REFUSAL_BODY)
_TOO_MANY = _refusal(b"431 Request Header Fields Too Large", b"too many request headers\n")
_TIMEOUT = _refusal(b"408 Request Timeout", _TIMEOUT_BODY)


class _Flow(FlowControl):
    """uvicorn's flow control, telling the protocol when reading pauses and resumes."""

    def __init__(
        self,
        transport: asyncio.Transport,
        on_pause: Callable[[], None],
        on_resume: Callable[[], None],
    ) -> None:
        super().__init__(transport)
        self._on_pause, self._on_resume = on_pause, on_resume

    def pause_reading(self) -> None:
        paused = self.read_paused
        super().pause_reading()
        if not paused:
            self._on_pause()

    def resume_reading(self) -> None:
        paused = self.read_paused
        super().resume_reading()
        if paused:
            self._on_resume()


class _ParsingStopped(Exception):
    """Raised from a parser callback to stop parsing the read at once."""


def head_bytes_in(carry: bytes, data: bytes) -> int:
    """How many bytes of `data` belong to the request head, `carry` being the head's last
    bytes before it: all of them, or up to and including the empty line that ends it."""
    window = carry + data
    ends = [i + len(end) for end in _HEAD_ENDS if (i := window.find(end)) >= 0]
    return max(min(ends) - len(carry), 0) if ends else len(data)


class BoundedHeadProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` that refuses a request head over `MAX_HEAD_BYTES` with `431`, and a
    request that does not arrive in time (`HEAD_TIMEOUT_S`, `BODY_TIMEOUT_S`) with `408`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # waiting for (the rest of) a request head
        self._head_size = 0
        self._head_tail = b""
        self._refused = False
        self._receiving = False  # a request has begun and has not all arrived
        self._arrival: asyncio.TimerHandle | None = None
        self._unread: asyncio.TimerHandle | None = None  # writing paused since
        self._answering: list[Any] = []  # the requests being answered (uvicorn's cycles)
        self._body_used, self._body_since = 0.0, 0.0  # the body's clock while the app reads

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _Flow(transport, self._reading_paused, self._reading_resumed)
        self._expect(HEAD_TIMEOUT_S)

    def _reading_paused(self) -> None:
        """The app has not taken what came: the body's clock stops, since the time it does
        not read (a big mail waiting its turn) is not the client's."""
        if self._receiving and not self._in_head and self._arrival is not None:
            self._body_used += self.loop.time() - self._body_since
            self._expect(None)

    def _reading_resumed(self) -> None:
        """The app reads again: the clock goes on with what is left of the body's
        `BODY_TIMEOUT_S` (never starts over: bursts that each fill the app's buffer would
        otherwise keep a slow upload open forever)."""
        if self._receiving and not self._in_head and not self._refused and self._arrival is None:
            self._body_since = self.loop.time()
            self._expect(max(BODY_TIMEOUT_S - self._body_used, 0.0))

    def connection_lost(self, exc: Exception | None) -> None:
        self._expect(None)
        self._stop_unread_clock()
        for cycle in self._answering:  # uvicorn marks only `self.cycle`, the newest
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self._answering = []
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._answering = [c for c in self._answering if not c.response_complete] + [cycle]
        super()._start_asgi_task(cycle, app)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._unread is None:
            self._unread = self.loop.call_later(WRITE_TIMEOUT_S, self._not_read)

    def resume_writing(self) -> None:
        self._stop_unread_clock()
        super().resume_writing()

    def _stop_unread_clock(self) -> None:
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None

    def _not_read(self) -> None:
        self._unread = None
        log.warning("connection closed: its answers were not read for %g s", WRITE_TIMEOUT_S)
        self._stop_reading_requests()
        self.transport.abort()

    def on_message_begin(self) -> None:
        if self._refused:
            return
        self._receiving = True
        self._expect(HEAD_TIMEOUT_S)  # the head's clock runs from its first byte
        super().on_message_begin()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._receiving:  # the next request has begun: its own clock runs, not keep-alive
            self._unset_keepalive_if_required()
        else:
            self._expect(HEAD_TIMEOUT_S)  # (uvicorn's keep-alive timeout may close it first)

    def _expect(self, seconds: float | None) -> None:
        """(Re)start the clock of what must arrive next; None stops it."""
        if self._arrival is not None:
            self._arrival.cancel()
        self._arrival = None if seconds is None else self.loop.call_later(seconds, self._late)

    def _late(self) -> None:
        self._arrival = None
        if self._answering_an_earlier_request():
            # Pipelined behind an answer still being produced (uvicorn reads no more of this
            # request meanwhile): that answer is never cut, so the clock waits for it.
            self._body_since = self.loop.time()  # the wait was not the body's time
            self._expect(HEAD_TIMEOUT_S if self._in_head else BODY_TIMEOUT_S)
        elif self._receiving and self._in_head:  # the app has nothing yet: ours to refuse
            log.warning(
                "request refused: its headers did not arrive within %g s status=408",
                HEAD_TIMEOUT_S,
            )
            self._close_with(_TIMEOUT)
        elif self._receiving:
            # The app has the request and is reading its body: it sees the disconnect and
            # writes the one line, with this reason (`web.app`); if it has answered already
            # (a 401 before reading), it has written its line.
            self._cut(408, f"its body did not arrive within {BODY_TIMEOUT_S:g} s")
        elif not self._answer_in_progress():  # idle: no request came
            self.transport.close()

    def _cut(self, status: int, why: str) -> None:
        """Close a connection whose request the app is reading: its read sees the disconnect,
        and the app's one line gives `why` (`web.app`); if it answered already (a 401 before
        reading), it has written its line."""
        self._stop_reading_requests()
        state = self.scope.setdefault("state", {})  # this request's (uvicorn copies it)
        state[CUT] = (status, why)
        self.transport.close()

    def _answer_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _answering_an_earlier_request(self) -> bool:
        """The request arriving waits behind another one's answer (HTTP pipelining): while its
        head arrives, `cycle` is still the earlier request's; once its head is in, uvicorn
        queues it in `pipeline` until that answer is done."""
        if not self._receiving:
            return False
        return self._answer_in_progress() if self._in_head else bool(self.pipeline)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # the connection is closing: nothing more is parsed
            return
        if self._in_head:
            self._head_size += head_bytes_in(self._head_tail, data)
            self._head_tail = (self._head_tail + data[-_CARRY:])[-_CARRY:]
            if self._head_size > MAX_HEAD_BYTES:
                self._refuse()
                return
        self._unset_keepalive_if_required()
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """uvicorn's `data_received`, except that a parse stopped by our own refusal (already
        logged, the connection closing) is not a second line and a 400 on a closed socket."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            if self._refused:
                return
            why = f"not valid HTTP/1.1 ({exc})"[:200]
            if self._reading_its_body():  # the app sees the disconnect and writes the one line
                self._cut(400, f"its body is {why}")
            elif self._answer_in_progress():
                self._close_after_answer(f"a pipelined request is {why}")
            else:
                message = "Invalid HTTP request received."
                self.logger.warning(message)
                self.send_400_response(message)

    def on_header(self, name: bytes, value: bytes) -> None:
        """A head's (or chunked body's trailer) field, at most `MAX_HEADERS` of them."""
        if self._refused:
            return
        if len(self.headers) >= MAX_HEADERS:
            why = f"more than {MAX_HEADERS} headers"
            if self._reading_its_body():  # trailers of a body the app reads: its one line
                self._cut(431, why)
            elif self._answer_in_progress() or not self._in_head:
                self._close_after_answer(why)  # pipelined, or trailers after an early answer
            else:
                log.warning("request refused: %s status=431", why)
                self._close_with(_TOO_MANY)
            raise _ParsingStopped
        super().on_header(name, value)

    def _reading_its_body(self) -> bool:
        """The app is reading the body of the request arriving now."""
        return (
            self._receiving
            and not self._in_head
            and self.cycle in self._answering
            and not self.cycle.response_complete
        )

    def _close_after_answer(self, why: str) -> None:
        """A request arriving behind an answer in progress is refused without a word (a
        response now would be taken as that answer's): it and any queued after it are dropped,
        and the connection closes once the answer in progress has gone out."""
        log.warning("request refused: %s; the connection closes after the answer before it", why)
        self._stop_reading_requests()
        self.pipeline.clear()
        answering = [cycle for cycle in self._answering if not cycle.response_complete]
        for cycle in answering:
            cycle.keep_alive = False
        if not answering:
            self.transport.close()

    def on_headers_complete(self) -> None:
        if self._refused:  # the rest of a read after a refusal: parsed, never queued
            return
        if len(self.pipeline) >= MAX_PIPELINED:
            log.warning("connection closed: more than %d pipelined requests waiting", MAX_PIPELINED)
            self._stop_reading_requests()
            self.transport.close()
            raise _ParsingStopped  # the rest of this read is not parsed (`_feed`)
        self._in_head = False
        self._body_used, self._body_since = 0.0, self.loop.time()
        self._expect(BODY_TIMEOUT_S)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        self._in_head, self._head_size, self._head_tail = True, 0, b""
        self._receiving = False
        # It has arrived: the app's answer is not timed here. If the app answered before it
        # all came (a 401 before reading the body), the wait for the next request starts now:
        # uvicorn's keep-alive timer was stopped by the body's bytes.
        self._expect(None if self._answer_in_progress() else HEAD_TIMEOUT_S)

    def _stop_reading_requests(self) -> None:
        """Nothing more of this connection is parsed or timed: it is being closed."""
        self._refused = True
        self._expect(None)

    def _refuse(self) -> None:
        log.warning(
            "request refused: headers over %d bytes (%d received) status=431",
            MAX_HEAD_BYTES,
            self._head_size,
        )
        self._close_with(_REFUSAL)

    def _close_with(self, refusal: bytes) -> None:
        self._stop_reading_requests()
        self.transport.write(refusal)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
