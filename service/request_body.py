"""Reading a request body without letting a client make us buffer more than a limit."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request


class BodyTooLarge(Exception):
    pass


async def stream_body(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, refused as soon as it passes `limit`: by
    Content-Length when the client declares one, else while the chunks stream in."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
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
