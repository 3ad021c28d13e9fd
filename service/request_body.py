"""Reading a request body without letting a client make us buffer more than a limit."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request

_LENGTH_DIGITS = 18  # an exabyte


class BodyTooLarge(Exception):
    pass


def declared_length(request: Request) -> int | None:
    """Content-Length as a number, None without one; a value too long to be real (Python's
    `int` refuses over 4,300 digits) counts as huge."""
    declared = request.headers.get("content-length")
    if not declared or not (declared.isascii() and declared.isdigit()):  # not "²"
        return None
    return int(declared) if len(declared) <= _LENGTH_DIGITS else 10**_LENGTH_DIGITS


async def stream_body(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, refused as soon as it passes `limit`: by
    Content-Length when the client declares one, else while the chunks stream in."""
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise BodyTooLarge
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, within `limit` (`stream_body`)."""
    return b"".join([chunk async for chunk in stream_body(request, limit)])
