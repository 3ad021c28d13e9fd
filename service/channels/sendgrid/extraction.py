"""Mail body extraction (MIME parsing, HTML to text, quote and signature stripping) in a child
process with a deadline, so that no mail, however built, can stall the serve process.

Why a process: a library can run away on hostile input while holding the GIL, so a thread
stalls the event loop just as much (measured with the reply stripper Parley used before: 2000
times `On ` took 1.6 s in `asyncio.to_thread`; the loop stalled 1.6 s). The text rules are
linear now, but the stdlib MIME parser still takes seconds on some mails within every cap, and
inscriptis is quadratic in a line's inline elements. A process can be killed at its deadline.
It is long-lived (a round trip costs ~0.3 ms, a fresh process per mail ~100 ms), started on
the first mail, never at idle, and it is the only place that imports lxml and inscriptis,
which keeps the serve process small.

Past the budget Parley does not wait: it kills the busy child (the next mail starts a new one)
and uses the text it has, truncated and unstripped (`limits.fallback_body`).

The children are shared fairly: a mail waiting for one goes before every larger mail waiting
(smallest first, then in order of arrival), and once it has waited `PREEMPT_AFTER_S` it stops
the longest-running larger mail that has run `PREEMPTIBLE_AFTER_S`, which then uses the text
it has. So a few hostile mails (large, since the caps bound a small mail's work) can no
longer spend an ordinary mail's budget in the queue behind them: before, four of them posted
at once made a short mail behind them wait out its whole budget and be stored without its
text.

The child is `python -m service.channels.sendgrid.extraction`; it speaks length-prefixed JSON
frames on its stdin/stdout (a request frame is followed by a length-prefixed blob: the raw
mail, if any).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import heapq
import itertools
import json
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage, MIMEPart
from typing import IO, Any

from service.channels.sendgrid.limits import (
    BOUNDED,
    MAX_TEXT_CHARS,
    cap_html,
    cap_mime,
    cap_text,
    decode_text,
    fallback_body,
    header_text,
)
from service.process_memory import return_big_frees_to_the_os

# The child's work on one mail, from handing it over to its last answer.
EXTRACT_DEADLINE_S = 1.0
# One mail in all: waiting for a free child, starting one, and its work. With the header-level
# read and the commit this keeps the webhook's answer within SPEC §9's 2 s.
EXTRACT_BUDGET_S = 1.5
# Children at most (started one by one as mails overlap): one per core on a small host.
EXTRACTION_PROCESSES = 2
# A mail that waited this long for a child stops a larger one that has run at least
# `PREEMPTIBLE_AFTER_S`. Ordinary mail takes a few milliseconds to tens of them, a raw mail
# with a 10 MB attachment ~0.3 s; a new child's start then takes ~0.1 s (more on a busy host),
# and the waiting mail's own work must still fit its budget.
PREEMPT_AFTER_S = 0.25
PREEMPTIBLE_AFTER_S = 0.5
MAX_FRAME_BYTES = 64 * 1024 * 1024
_WRITE_SLICE_BYTES = 256 * 1024
_STOP_WAIT_S = 2.0

Attachments = list[dict[str, object]]


@dataclass(frozen=True)
class MailContent:
    """A mail's body as the webhook has it: parsed-mode text fields, or the raw MIME message."""

    plain: str | None = None
    html: str | None = None
    mime: bytes | None = None
    subject: str = ""  # a "Fwd:" subject tells a plain-text forward from a reply
    own_replies: tuple[str, ...] = ()  # Parley's earlier replies, whose quoted copies go


@dataclass(frozen=True)
class Extracted:
    body: str
    attachments: Attachments = field(default_factory=list)
    problem: str | None = None  # set when the fallback text was used, and why


# ---------------------------------------------------------------- in the child


def extract_body(
    plain: str | None, html: str | None, subject: str = "", own_replies: Sequence[str] = ()
) -> str:
    """The text the model should see: the person's new words, no quote of the history nor of
    Parley's own earlier replies (`text.new_text`), from capped input. The one place
    that calls `text`."""
    from service.channels.sendgrid.text import new_text

    text = new_text(
        cap_text(plain) if plain else None,
        cap_html(html) if html else None,
        own_replies=own_replies,
        subject=subject,
    )
    return text[:MAX_TEXT_CHARS]  # HTML renders to more text than it had: one cap for both


def read_mime(raw: bytes) -> tuple[str | None, str | None, Attachments]:
    """The plain and HTML bodies and the attachment list of a raw mail, its structure and
    headers capped first (`cap_mime`, `BOUNDED`)."""
    message = email.message_from_bytes(cap_mime(raw), policy=BOUNDED)
    assert isinstance(message, EmailMessage)
    plain = _part_text(message.get_body(preferencelist=("plain",)))
    page = _part_text(message.get_body(preferencelist=("html",)))
    return (
        cap_text(plain) if plain is not None else None,
        cap_html(page) if page is not None else None,
        _attachments_of(message),
    )


def _part_text(part: MIMEPart | None) -> str | None:
    """A text part's content in its declared charset, as well as possible when that lies."""
    if part is None:
        return None
    try:
        content = part.get_content()
        return content if isinstance(content, str) else ""
    except (LookupError, UnicodeError, ValueError):
        payload = part.get_payload(decode=True)
        raw = payload if isinstance(payload, bytes) else b""
        return decode_text(raw, part.get_content_charset() or "utf-8")


def _attachments_of(message: EmailMessage) -> Attachments:
    return [
        {
            "name": header_text(part.get_filename() or ""),
            "type": header_text(part.get_content_type()),
            "size": len(part.get_payload(decode=True) or b""),
        }
        for part in message.iter_attachments()
    ]


def _answers(request: dict[str, Any], mime: bytes) -> Iterator[dict[str, Any]]:
    """A raw mail's MIME result first, so the parent has its text if stripping overruns."""
    plain, page = request.get("plain"), request.get("html")
    if mime:
        plain, page, attachments = read_mime(mime)
        yield {"kind": "mime", "plain": plain, "html": page, "attachments": attachments}
    subject, own = str(request.get("subject") or ""), request.get("own_replies") or []
    yield {"kind": "body", "body": extract_body(plain, page, subject, [str(r) for r in own])}


def _write(stream: IO[bytes], message: dict[str, Any]) -> None:
    stream.write(frame(message))
    stream.flush()


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def _read_request(stream: IO[bytes]) -> tuple[dict[str, Any], bytes] | None:
    parts = []
    for _ in range(2):
        head = _read_exactly(stream, 4)
        if head is None:
            return None
        data = _read_exactly(stream, int.from_bytes(head, "big"))
        if data is None:
            return None
        parts.append(data)
    return json.loads(parts[0]), parts[1]


def main() -> None:
    """The child's loop: one request at a time until its stdin closes."""
    warnings.simplefilter("ignore")  # a library's warning must not clutter the server's log
    return_big_frees_to_the_os()  # a 10 MB mail's parse takes ~90 MB, for that mail only
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent
    # stops us by closing stdin (or by SIGKILL)
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the protocol
    import inscriptis  # noqa: F401 - paid for at start, not by the first HTML mail

    import service.channels.sendgrid.text  # noqa: F401

    _write(protocol, {"kind": "ready"})
    while (request := _read_request(sys.stdin.buffer)) is not None:
        fields, mime = request
        try:
            for answer in _answers(fields, mime):
                _write(protocol, answer)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which falls back
            error = header_text(f"{type(exc).__name__}: {exc}")[:300]  # one log line
            _write(protocol, {"kind": "error", "error": error})


# ---------------------------------------------------------------- in the serve process


def frame(message: dict[str, Any]) -> bytes:
    """A length-prefixed JSON frame (a request's blob follows it with its own length)."""
    data = json.dumps(message).encode("utf-8")
    return len(data).to_bytes(4, "big") + data


class ChildFailed(Exception):
    """The child went away or broke the protocol: it cannot be used again."""


class ExtractionError(ChildFailed):
    """The child reported an error for this mail; it is still fine for the next one."""


class Preempted(ChildFailed):
    """The child was stopped mid-mail for a smaller mail that had waited (`PREEMPT_AFTER_S`)."""


async def _read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        size = int.from_bytes(await reader.readexactly(4), "big")
        if size > MAX_FRAME_BYTES:
            raise ChildFailed(f"the extraction process sent a {size}-byte frame")
        answer: dict[str, Any] = json.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, OSError) as exc:
        raise ChildFailed("the extraction process exited") from exc
    return answer


@dataclass
class _Partial:
    """What is known of a mail's text so far: the fallback if the child does not finish."""

    plain: str | None
    html: str | None
    attachments: Attachments = field(default_factory=list)

    def fallback(self, problem: str) -> Extracted:
        return Extracted(fallback_body(self.plain, self.html), self.attachments, problem)


class _Child:
    """One running extraction process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        assert process.stdin is not None and process.stdout is not None
        self._stdin = process.stdin
        self._stdout = process.stdout

    @classmethod
    async def start(cls) -> _Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.channels.sendgrid.extraction",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        child = cls(process)
        try:
            if (await _read_frame(child._stdout)).get("kind") != "ready":
                raise ChildFailed("the extraction process did not start")
        except BaseException:
            await child.kill()
            raise
        return child

    async def run(self, content: MailContent, partial: _Partial) -> Extracted:
        request = {
            "plain": content.plain,
            "html": content.html,
            "subject": content.subject,
            "own_replies": list(content.own_replies),
        }
        try:
            await self._send(request, content.mime or b"")
        except OSError as exc:  # it died (or was stopped, `Extractor._preempt`) mid-write
            raise ChildFailed(f"the extraction process went away: {exc}") from exc
        while True:
            answer = await _read_frame(self._stdout)
            if answer["kind"] == "mime":
                partial.plain, partial.html = answer["plain"], answer["html"]
                partial.attachments = answer["attachments"]
            elif answer["kind"] == "body":
                return Extracted(answer["body"], partial.attachments)
            else:
                raise ExtractionError(str(answer.get("error", "unknown answer")))

    async def _send(self, request: dict[str, Any], blob: bytes) -> None:
        """The request frame, its blob in slices: the pipe's write buffer never holds more
        than one slice of a 10 MB mail (a single write would copy all of it there)."""
        self._stdin.write(frame(request) + len(blob).to_bytes(4, "big"))
        view = memoryview(blob)
        for start in range(0, len(blob), _WRITE_SLICE_BYTES):
            self._stdin.write(view[start : start + _WRITE_SLICE_BYTES])
            await self._stdin.drain()
        await self._stdin.drain()  # the frame itself, when there is no blob

    def interrupt(self) -> None:
        """Kill it now, from a callback; `kill` then only reaps it."""
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()

    async def kill(self) -> None:
        self.interrupt()
        await self._process.wait()

    async def stop(self) -> None:
        """Close its stdin (it exits at end of input); kill it if it does not."""
        self._stdin.close()
        try:
            await asyncio.wait_for(self._process.wait(), _STOP_WAIT_S)
        except TimeoutError:
            await self.kill()


@dataclass
class _Slot:
    """One child's place, and the mail it is working on."""

    child: _Child | None = None
    size: int = 0  # the mail's size in bytes
    since: float | None = None  # when it took the mail; None while idle
    preempted: bool = False  # stopped for a smaller mail (`Preempted`)


def _size(content: MailContent) -> int:
    return len(content.mime or b"") + len(content.plain or "") + len(content.html or "")


class Extractor:
    """Up to `processes` extraction children, started as mails need them and shared smallest
    mail first (see the module's docstring). `extract` never takes much longer than
    `budget_s`, whatever the mail."""

    def __init__(
        self,
        budget_s: float = EXTRACT_BUDGET_S,
        deadline_s: float = EXTRACT_DEADLINE_S,
        processes: int = EXTRACTION_PROCESSES,
        preempt_after_s: float = PREEMPT_AFTER_S,
        preemptible_after_s: float = PREEMPTIBLE_AFTER_S,
    ) -> None:
        self._budget_s = budget_s
        self._deadline_s = deadline_s
        self._preempt_after_s = preempt_after_s
        self._preemptible_after_s = preemptible_after_s
        self._all = [_Slot() for _ in range(processes)]
        self._idle = list(self._all)  # popped from the end: the warm child first
        # Mails waiting for a slot: (size, arrival, future); a cancelled one stays until popped.
        self._waiting: list[tuple[int, int, asyncio.Future[_Slot]]] = []
        self._arrivals = itertools.count()

    @property
    def running(self) -> int:
        return sum(slot.child is not None for slot in self._all)

    @property
    def waiting(self) -> int:
        """Mails waiting for a child now."""
        return sum(not future.done() for _, _, future in self._waiting)

    async def extract(self, content: MailContent) -> Extracted:
        """The mail's text, or past the budget (or if the child fails) the text it has."""
        partial = _Partial(content.plain, content.html)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._budget_s):
                slot = await self._take(_size(content))
                try:
                    return await self._run(slot, content, partial)
                finally:
                    self._release(slot)
        except TimeoutError:
            waited = time.monotonic() - started
            return partial.fallback(f"body extraction stopped after {waited:.1f} s")
        except Preempted:
            waited = time.monotonic() - started
            return partial.fallback(
                f"body extraction stopped after {waited:.1f} s for a smaller mail's turn"
            )
        except ChildFailed as exc:
            return partial.fallback(f"body extraction failed: {exc}")

    async def _take(self, size: int) -> _Slot:
        """A free slot, at once or in its turn; once it has waited `preempt_after_s`, it stops
        larger mails that have run `preemptible_after_s` (one at a time)."""
        if self._idle:  # a slot is idle only while nobody waits
            slot = self._idle.pop()
        else:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[_Slot] = loop.create_future()
            heapq.heappush(self._waiting, (size, next(self._arrivals), future))
            timer: list[asyncio.TimerHandle] = []  # the next check, re-armed by `_preempt`
            timer.append(loop.call_later(self._preempt_after_s, self._preempt, size, future, timer))
            try:
                slot = await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():  # handed over as it was cancelled
                    self._release(future.result())
                raise
            finally:
                timer[0].cancel()
        slot.size = size
        return slot

    def _preempt(
        self, size: int, future: asyncio.Future[_Slot], timer: list[asyncio.TimerHandle]
    ) -> None:
        if future.done():
            return
        now = time.monotonic()
        larger = [
            slot
            for slot in self._all
            if slot.child is not None
            and slot.since is not None
            and slot.size > size
            and not slot.preempted
        ]
        oldest = min(larger, key=lambda slot: slot.since or now, default=None)
        check_in = self._preempt_after_s  # after a preemption, or with no larger mail at work
        if oldest is not None and oldest.since is not None:
            ran = now - oldest.since
            if ran >= self._preemptible_after_s:
                oldest.preempted = True
                assert oldest.child is not None
                oldest.child.interrupt()  # its reader sees the end of the stream: `Preempted`
            else:  # look again the moment it may be stopped
                check_in = self._preemptible_after_s - ran
        loop = asyncio.get_running_loop()
        timer[0] = loop.call_later(check_in, self._preempt, size, future, timer)

    def _release(self, slot: _Slot) -> None:
        slot.since, slot.preempted = None, False
        while self._waiting:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(slot)
                return
        self._idle.append(slot)

    async def _run(self, slot: _Slot, content: MailContent, partial: _Partial) -> Extracted:
        if slot.child is None:
            slot.child = await _Child.start()
        slot.since = time.monotonic()  # a child's start is not the mail's work: not preempted
        try:
            async with asyncio.timeout(self._deadline_s):
                extracted = await slot.child.run(content, partial)
        except ExtractionError:
            raise
        except BaseException as exc:  # gone, over the deadline or cancelled mid-mail: not reusable
            await self._discard(slot)
            if slot.preempted and isinstance(exc, ChildFailed):
                raise Preempted(str(exc)) from exc
            raise
        if slot.preempted:  # stopped as its answer came in: the answer stands, the child is gone
            await self._discard(slot)
        return extracted

    @staticmethod
    async def _discard(slot: _Slot) -> None:
        child, slot.child = slot.child, None
        if child is not None:
            await child.kill()

    async def close(self) -> None:
        for slot in self._all:
            child, slot.child = slot.child, None
            if child is not None:
                await child.stop()


if __name__ == "__main__":
    main()
