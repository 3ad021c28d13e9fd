"""Fast loopback fakes of Twilio's Messages API and OpenAI's chat completions, for benchmarks.

    python -m bench.fastfakes [--port 0] [--model-latency 0]

tests/fakes.py is the faithful fake (validation, plans, paging) and costs about a millisecond
of CPU a request inside the test process. A throughput benchmark needs the opposite: a fake
that costs next to nothing, in its own process so its CPU is not counted as Parley's and does
not take the GIL from the load generator. This is a bare asyncio HTTP/1.1 server (keep-alive,
Content-Length bodies: what the twilio SDK's aiohttp and the openai SDK's httpx send) with
three routes:

* `POST /2010-04-01/Accounts/{sid}/Messages.json`: accepts the SMS (201, a Message resource
  as the twilio SDK parses it);
* `GET` of the same: the messages it accepted To/From those numbers, newest first, so
  Parley's lookup of an ambiguous send finds one that went out (as with real Twilio);
* `POST /v1/chat/completions`: after `--model-latency` seconds, answers `echo: <the newest
  user message>`, so every reply names the message it answers.
* `POST /v3/mail/send` (SendGrid): 202, so a configured SendGrid works too.

Every event is one tab-separated line on stdout, flushed once per event-loop turn, which the
benchmark reads as it happens (its clock: `time.monotonic()`, the same in every process):

    ready <port>
    sms <time> <To> <Body>        Twilio accepted an SMS
    model <time> <calls in flight, this one included>
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import secrets
import sys
import time
from typing import Any
from urllib.parse import parse_qs

HEAD_END = b"\r\n\r\n"
MESSAGES_PATH = "/Messages.json"


class Events:
    """Event lines to stdout, written once per loop turn (one write for many events)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lines: list[str] = []

    def emit(self, *fields: object) -> None:
        if not self._lines:
            self._loop.call_soon(self._flush)
        self._lines.append("\t".join(str(f).replace("\t", " ") for f in fields))

    def _flush(self) -> None:
        sys.stdout.write("\n".join(self._lines) + "\n")
        sys.stdout.flush()
        self._lines.clear()


class Fakes:
    """The routes' logic, shared by every connection."""

    def __init__(self, events: Events, model_latency_s: float) -> None:
        self.events = events
        self.model_latency_s = model_latency_s
        self.models_in_flight = 0
        self.sent: dict[tuple[str | None, str | None], list[dict[str, Any]]] = {}

    def twilio_create(self, account: str, body: bytes) -> tuple[int, bytes]:
        fields = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        self.events.emit("sms", time.monotonic(), fields.get("To", ""), fields.get("Body", ""))
        record = {
            "account_sid": account,
            "sid": "SM" + secrets.token_hex(16),
            "to": fields.get("To"),
            "from": fields.get("From"),
            "body": fields.get("Body", ""),
            "date_created": email.utils.formatdate(usegmt=True),
        }
        self.sent.setdefault((record["to"], record["from"]), []).append(record)
        return 201, json.dumps(_message(record, listed=False)).encode()

    def twilio_list(self, path: str) -> tuple[int, bytes]:
        """Messages sent To/From these numbers, newest first, as Twilio lists them: what the
        lookup of an ambiguous send reads (it must find a message that went out)."""
        query = {k: v[0] for k, v in parse_qs(path.partition("?")[2]).items()}
        size = int(query.get("PageSize", "50"))
        found = self.sent.get((query.get("To"), query.get("From")), [])[::-1][:size]
        page = {
            "messages": [_message(r, listed=True) for r in found],
            "page": 0,
            "page_size": size,
            "first_page_uri": path,
            "next_page_uri": None,
            "previous_page_uri": None,
            "uri": path,
            "start": 0,
            "end": max(len(found) - 1, 0),
        }
        return 200, json.dumps(page).encode()

    def model_started(self) -> None:
        self.models_in_flight += 1
        self.events.emit("model", time.monotonic(), self.models_in_flight)

    def model_answer(self, body: bytes) -> tuple[int, bytes]:
        self.models_in_flight -= 1
        request = json.loads(body)
        newest = next(
            (m.get("content") for m in reversed(request["messages"]) if m.get("role") == "user"),
            "",
        )
        text = f"echo: {newest}"
        completion: dict[str, Any] = {
            "id": "chatcmpl-" + secrets.token_hex(8),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
        return 200, json.dumps(completion).encode()


def _message(record: dict[str, Any], *, listed: bool) -> dict[str, Any]:
    """A Message resource as the twilio SDK parses it: "queued" when created, "sent" (with
    its date_sent) when listed later."""
    account, sid = record["account_sid"], record["sid"]
    return {
        **record,
        "api_version": "2010-04-01",
        "date_sent": record["date_created"] if listed else None,
        "date_updated": record["date_created"],
        "direction": "outbound-api",
        "error_code": None,
        "error_message": None,
        "num_media": "0",
        "num_segments": "1",
        "price": None,
        "price_unit": "USD",
        "status": "sent" if listed else "queued",
        "uri": f"/2010-04-01/Accounts/{account}/Messages/{sid}.json",
    }


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests answered in order."""

    def __init__(self, fakes: Fakes) -> None:
        self.fakes = fakes
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(HEAD_END)) >= 0:
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            start = end + len(HEAD_END)
            if len(self.buffer) < start + length:
                return
            body = self.buffer[start : start + length]
            self.buffer = self.buffer[start + length :]
            method, path, _ = head[0].split(" ", 2)
            self.route(method, path, body)

    def route(self, method: str, path: str, body: bytes) -> None:
        route = path.split("?", 1)[0]
        if route == "/v1/chat/completions" and method == "POST":
            self.fakes.model_started()
            loop = asyncio.get_running_loop()
            answer = lambda: self.respond(*self.fakes.model_answer(body))  # noqa: E731
            if self.fakes.model_latency_s > 0:
                loop.call_later(self.fakes.model_latency_s, answer)
            else:
                answer()
        elif route.endswith(MESSAGES_PATH) and route.startswith("/2010-04-01/Accounts/"):
            account = route.split("/")[3]
            if method == "POST":
                self.respond(*self.fakes.twilio_create(account, body))
            else:
                self.respond(*self.fakes.twilio_list(path))
        elif route == "/v3/mail/send":
            self.respond(202, b"", {"X-Message-Id": secrets.token_urlsafe(16)})
        else:
            self.respond(404, b'{"message": "fastfakes: no such route"}')

    def respond(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = (
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n"
        )
        self.transport.write(head.encode() + body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int, model_latency_s: float) -> None:
    loop = asyncio.get_running_loop()
    fakes = Fakes(Events(loop), model_latency_s)
    server = await loop.create_server(lambda: Connection(fakes), "127.0.0.1", port, backlog=4096)
    fakes.events.emit("ready", server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model-latency", type=float, default=0.0, help="seconds per model call")
    args = parser.parse_args()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(serve(args.port, args.model_latency))


if __name__ == "__main__":
    main()
