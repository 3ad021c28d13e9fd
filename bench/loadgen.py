"""Signed Twilio webhooks, posted cheaply: the load side of bench/replies.py.

An httpx client costs about a millisecond of CPU a request, which on a 2-core machine is CPU
taken from the server under test. These clients write pre-built HTTP/1.1 requests on raw
keep-alive connections (reconnecting when the server closes, as gunicorn's sync workers do
after every response) and read just the status line and Content-Length: tens of microseconds
a request. Throughput runs use `wrk` with bench/requests.lua instead; these serve the runs
that need each message's own timing:

* `paced`: an open loop at a fixed rate (Twilio does not wait for Parley before posting the
  next message), latency counted from each webhook's scheduled time;
* `conversations`: closed loops, one per sender, each texting its next message once the
  previous one was answered (webhook acknowledged and reply SMS received).

The fake Twilio's events (bench/fastfakes.py) arrive through `SmsLog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

try:  # main moved the request builders to service/testing.py after this branch started
    from service.testing import inbound_form, sign
except ImportError:
    from service.channels.sms import inbound_form, sign

TOKEN = "bench-token-0123456789abcdef"
PUBLIC = "https://parley.example.com"
ACCOUNT = "AC" + "b" * 32
PARLEY_NUMBER = "+15559990000"
SMS_PATH = "/webhooks/twilio/sms"
WEBHOOK_TIMEOUT_S = 60.0  # far past Twilio's 15 s, so slow answers are measured, not cut


def sender_number(sender: int) -> str:
    return f"+1555{sender:07d}"


@dataclass(frozen=True)
class Webhook:
    """One inbound SMS as Twilio would post it, signed; `reply` is the fake model's answer."""

    sender: str
    body: str
    signature: str
    form: str  # urlencoded

    @property
    def reply(self) -> str:
        return f"echo: {self.body}"

    def request(self) -> bytes:
        return (
            f"POST {SMS_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"X-Twilio-Signature: {self.signature}\r\nUser-Agent: TwilioProxy/1.1\r\n"
            f"Content-Length: {len(self.form)}\r\n\r\n{self.form}"
        ).encode()


def signed(sender: str, body: str) -> Webhook:
    """A new message (fresh MessageSid) from `sender`, signed as Twilio would."""
    form = inbound_form(body, sender, PARLEY_NUMBER, "SM" + secrets.token_hex(16), ACCOUNT)
    return Webhook(sender, body, sign(TOKEN, PUBLIC + SMS_PATH, form), urlencode(form))


def webhooks(count: int, senders: int = 0, tag: str = "") -> list[Webhook]:
    """`count` distinct signed webhooks; from `senders` people in turn, or each from a new
    sender when `senders` is 0. `tag` keeps bodies distinct between runs sharing a fake."""
    return [
        signed(sender_number(i % senders if senders else i), f"bench{tag} message {i}")
        for i in range(count)
    ]


def write_wrk_file(path: Path, hooks: Iterable[Webhook]) -> Path:
    """The "<signature>\\t<form>" lines bench/requests.lua replays."""
    with path.open("w") as out:
        for hook in hooks:
            out.write(f"{hook.signature}\t{hook.form}\n")
    return path


# ------------------------------------------------------------------ the fake Twilio's record


@dataclass
class SmsLog:
    """Every SMS the fake Twilio accepted, with its time, as the fake reports them."""

    times: dict[tuple[str, str], float] = field(default_factory=dict)  # first (To, Body)
    count: int = 0
    doubled: int = 0  # the same (To, Body) accepted more than once
    model_calls: int = 0
    model_max_in_flight: int = 0
    _waiters: dict[str, list[Callable[[str], None]]] = field(default_factory=dict)

    def on_line(self, line: str) -> None:
        kind, *fields = line.rstrip("\n").split("\t")
        if kind == "sms":
            moment, to, body = float(fields[0]), fields[1], fields[2]
            self.count += 1
            if (to, body) in self.times:
                self.doubled += 1
            else:
                self.times[(to, body)] = moment
            for notify in self._waiters.pop(to, []):
                notify(body)
        elif kind == "model":
            self.model_calls += 1
            self.model_max_in_flight = max(self.model_max_in_flight, int(fields[1]))

    def sent_at(self, hook: Webhook) -> float | None:
        return self.times.get((hook.sender, hook.reply))

    async def reply_to(self, hook: Webhook, timeout_s: float) -> float | None:
        """When the reply to `hook` was accepted, waiting up to `timeout_s`."""
        if (sent := self.sent_at(hook)) is not None:
            return sent
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            arrived = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(hook.sender, []).append(
                lambda body, f=arrived: f.done() or f.set_result(body)
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived, left)
            if (sent := self.sent_at(hook)) is not None:
                return sent
        return None

    def replies_between(self, start: float, end: float) -> int:
        return sum(start <= t < end for t in self.times.values())


# ------------------------------------------------------------------ raw HTTP/1.1 posting


class Link:
    """One client connection; reopened when the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> int:
        """The answer's status code; 0 when the connection failed. A kept-alive connection the
        server closed while idle (uvicorn does after 5 s) is reopened and the request sent
        again, as HTTP clients do: the server had not read it."""
        for attempt in range(2):
            reused = self.writer is not None
            try:
                async with asyncio.timeout(WEBHOOK_TIMEOUT_S):
                    return await self._exchange(request)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                await self.close()
                stale = reused and isinstance(exc, (asyncio.IncompleteReadError, OSError))
                if not stale or attempt:
                    return 0
        return 0

    async def _exchange(self, request: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(request)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        status = int(head.split(" ", 2)[1])
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name == "content-length":
                length = int(value)
        await self.reader.readexactly(length)
        if "connection: close" in head:
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


@dataclass
class Posted:
    """One webhook's fate: when it was due, when it was acknowledged, with what status."""

    hook: Webhook
    due: float
    acked: float | None = None
    status: int = 0

    @property
    def ack_s(self) -> float | None:
        return None if self.acked is None else self.acked - self.due


async def paced(port: int, hooks: list[Webhook], rate: float, connections: int) -> list[Posted]:
    """Post `hooks` at `rate` a second from up to `connections` connections at once. A webhook
    that finds every connection busy goes out late; its latency still counts from when it
    was due, as Twilio's clock would."""
    start = time.monotonic() + 0.2
    posted = [Posted(hook, start + i / rate) for i, hook in enumerate(hooks)]
    pending = iter(posted)

    async def connection() -> None:
        link = Link(port)
        for item in pending:
            await asyncio.sleep(max(0.0, item.due - time.monotonic()))
            item.status = await link.post(item.hook.request())
            item.acked = time.monotonic()
        await link.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return posted


@dataclass
class Conversations:
    """What closed-loop senders saw."""

    started: float
    ended: float  # when senders stopped texting
    finished: float  # when the last sender gave up waiting
    posted: list[Posted]
    reply_s: list[float]  # webhook due -> its reply accepted by Twilio
    unfinished: list[Posted]  # no acknowledgement, or no reply, by the end


async def conversations(
    port: int, senders: int, seconds: float, sms: SmsLog, drain_s: float
) -> Conversations:
    """`senders` people, each texting, waiting for the acknowledgement and the reply, then
    texting again, for `seconds`; then up to `drain_s` more for answers still owed."""
    started = time.monotonic()
    ends = started + seconds
    gives_up = ends + drain_s
    result = Conversations(started, ends, gives_up, [], [], [])

    async def person(number: int) -> None:
        link = Link(port)
        for i in range(1_000_000):
            if time.monotonic() >= ends:
                break
            hook = signed(sender_number(number), f"sender {number} message {i}")
            item = Posted(hook, time.monotonic())
            result.posted.append(item)
            ack = asyncio.ensure_future(link.post(hook.request()))
            try:
                async with asyncio.timeout(max(gives_up - time.monotonic(), 0.001)):
                    item.status = await asyncio.shield(ack)
                    item.acked = time.monotonic()
                    sent = await sms.reply_to(hook, gives_up - time.monotonic())
            except TimeoutError:
                sent = None
            if sent is None:
                result.unfinished.append(item)
                ack.cancel()
                break
            result.reply_s.append(sent - item.due)
        await link.close()

    await asyncio.gather(*(person(n) for n in range(senders)))
    result.finished = time.monotonic()
    return result
