"""A model server that does not quite speak HTTP: a few lines of asyncio on 127.0.0.1 that
read one request and answer the bytes a test chose (a garbage status line, a bad header,
nothing), or hang. The fake providers (tests/fakes.py) are a real HTTP server and cannot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


def http_answer(status_line: str, *headers: str, body: bytes = b"") -> bytes:
    head = "\r\n".join([status_line, *headers, f"Content-Length: {len(body)}", "", ""])
    return head.encode("latin-1") + body


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)


@asynccontextmanager
async def model_server(answer: bytes | None, *, hang: bool = False) -> AsyncIterator[str]:
    """A server at the yielded base URL that reads one request, then writes `answer` (None:
    nothing) and closes the connection, or, with `hang`, keeps it open without a word."""
    held: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        if hang:
            held.append(writer)
            return
        if answer is not None:
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with server:
            yield f"http://127.0.0.1:{port}/v1"
    finally:
        for writer in held:
            writer.close()
