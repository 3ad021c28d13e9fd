"""uvicorn's HTTP protocol (httptools) with a bound on the request head.

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
"""

from __future__ import annotations

import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
LINGER_S = 1.0
_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")
_CARRY = 3  # a head end split across two reads is still found
_REFUSAL_BODY = b"request headers over 64 KiB\n"
_REFUSAL = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\n"
    b"connection: close\r\n"
    b"\r\n%s"
) % (len(_REFUSAL_BODY), _REFUSAL_BODY)


def head_bytes_in(carry: bytes, data: bytes) -> int:
    """How many bytes of `data` belong to the request head, `carry` being the head's last
    bytes before it: all of them, or up to and including the empty line that ends it."""
    window = carry + data
    ends = [i + len(end) for end in _HEAD_ENDS if (i := window.find(end)) >= 0]
    return max(min(ends) - len(carry), 0) if ends else len(data)


class BoundedHeadProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` that refuses a request head over `MAX_HEAD_BYTES` with `431`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # waiting for (the rest of) a request head
        self._head_size = 0
        self._head_tail = b""
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:  # the connection is closing: nothing more is parsed
            return
        if self._in_head:
            self._head_size += head_bytes_in(self._head_tail, data)
            self._head_tail = (self._head_tail + data[-_CARRY:])[-_CARRY:]
            if self._head_size > MAX_HEAD_BYTES:
                self._refuse()
                return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_size, self._head_tail = True, 0, b""

    def _refuse(self) -> None:
        log.warning(
            "request refused: headers over %d bytes (%d received) status=431",
            MAX_HEAD_BYTES,
            self._head_size,
        )
        self._refused = True
        self.transport.write(_REFUSAL)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
