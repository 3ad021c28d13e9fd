"""Inbound Parse posts built from the recorded SendGrid fixtures with some fields changed, framed
exactly as the fixture script frames SendGrid's own (boundary `xYzZY`, part headers, CRLF), and
correctly authenticated. Also the hostile mails the tests and `bench/hostile_mail.py` send."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from tests.fixtures.make_sendgrid_fixtures import Field, form_data, http_headers, read_with_email
from tests.helpers import recorded_body, recording
from tests.processes import parley_env

INBOUND = "/webhooks/sendgrid/inbound"
CREDENTIALS = "Basic " + base64.b64encode(b"parley:inbound-secret").decode()


def fixture_fields(name: str) -> list[Field]:
    """The form fields of a recorded post, in their order, with their raw bytes."""
    data = recording(f"sendgrid/{name}.json")
    return read_with_email(recorded_body(data), data["headers"]["Content-Type"])


def with_fields(name: str, **changes: str | bytes | None) -> list[Field]:
    """A recorded post with fields replaced (str is sent as UTF-8), added, or removed (None)."""
    fields = fixture_fields(name)
    names = {item.name for item in fields}
    changed = []
    for item in fields:
        if item.name not in changes:
            changed.append(item)
        elif (value := changes[item.name]) is not None:
            changed.append(dataclasses.replace(item, value=_bytes(value)))
    for key, value in changes.items():
        if key not in names and value is not None:
            changed.append(Field(key, _bytes(value)))
    return changed


def _bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def request_of(fields: list[Field]) -> tuple[dict[str, str], bytes]:
    body = form_data(fields)
    headers = {
        k: v for k, v in http_headers(body).items() if k.lower() not in ("host", "content-length")
    }
    return headers, body


async def post_fields(client: httpx.AsyncClient, fields: list[Field]) -> httpx.Response:
    headers, body = request_of(fields)
    return await client.post(INBOUND, headers=headers, content=body)


def replace_headers(headers: str, replaced: dict[str, str]) -> str:
    """A parsed-mode `headers` field with some headers' values replaced (added if absent)."""
    names = {name.lower() + ":" for name in replaced}
    kept = [
        line
        for line in headers.split("\r\n")
        if line and not any(line.lower().startswith(n) for n in names)
    ]
    return "\r\n".join([*kept, *(f"{k}: {v}" for k, v in replaced.items())]) + "\r\n"


def headers_field(name: str) -> str:
    return next(f.value for f in fixture_fields(name) if f.name == "headers").decode()


def parsed_with_headers(
    name: str, replaced: dict[str, str], **changes: str | bytes | None
) -> list[Field]:
    """Parsed-mode fixture `name` with headers of its `headers` field replaced."""
    return with_fields(name, headers=replace_headers(headers_field(name), replaced), **changes)


def raw_mail(headers: dict[str, str], body: bytes) -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("utf-8") + b"\r\n" + body


def raw_post(message_id: str, extra: dict[str, str], body: bytes) -> list[Field]:
    """The `raw_gmail` fixture (Send Raw) carrying another MIME message."""
    headers = {
        "From": "Alice Martins <alice@example.com>",
        "To": "assistant@parley.example.com",
        "Subject": "Hi",
        "Message-ID": message_id,
        "MIME-Version": "1.0",
        **extra,
    }
    return with_fields("raw_gmail", email=raw_mail(headers, body))


# ---------------------------------------------------------------- hostile mails

# Each one: a name, and a builder of its fields from a unique Message-ID.
Hostile = tuple[str, Callable[[str], list[Field]]]


def _text_mail(text: str) -> Callable[[str], list[Field]]:
    def build(message_id: str) -> list[Field]:
        return parsed_with_headers("gmail_first", {"Message-ID": message_id}, text=text, html=None)

    return build


def _many_parts(message_id: str) -> list[Field]:
    parts = b"".join(
        b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(30_000)
    )
    return raw_post(
        message_id,
        {"Content-Type": 'multipart/mixed; boundary="b"'},
        b"--b\r\nContent-Type: text/plain\r\n\r\nHello from many parts\r\n" + parts + b"--b--\r\n",
    )


def _deep_nesting(message_id: str) -> list[Field]:
    depth = 2_000
    body = b"".join(
        b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1)
        for i in range(depth)
    )
    body += b"--b%d\r\nContent-Type: text/plain\r\n\r\ndeep\r\n" % depth
    body += b"".join(b"--b%d--\r\n" % i for i in reversed(range(depth + 1)))
    return raw_post(message_id, {"Content-Type": 'multipart/mixed; boundary="b0"'}, body)


NESTED_TYPE = {"Content-Type": 'multipart/mixed; boundary="b0"'}


def nested_short_lines_body() -> bytes:
    """Within every cap, still seconds of stdlib MIME parsing: 19 open boundaries checked on
    each of 1.7 million short lines. Only the extraction deadline stops this one."""
    depth = 19
    body = b"".join(
        b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1)
        for i in range(depth)
    )
    body += b"--b%d\r\nContent-Type: text/plain\r\n\r\nHello\r\n" % depth + b"x\r\n" * 1_700_000
    return body + b"".join(b"--b%d--\r\n" % i for i in reversed(range(depth + 1)))


def _nested_short_lines(message_id: str) -> list[Field]:
    return raw_post(message_id, NESTED_TYPE, nested_short_lines_body())


def _semicolons(message_id: str) -> list[Field]:
    return raw_post(
        message_id,
        {"Content-Type": "text/plain" + ";" * 20_000},
        b"Hello from a long Content-Type\r\n",
    )


def _encoded_subject(message_id: str) -> list[Field]:
    subject = "=?utf-8?q?a?= " * 20_000
    return parsed_with_headers(
        "gmail_first",
        {"Message-ID": message_id, "Subject": subject},
        text="Hello from a long subject",
        html=None,
    )


HOSTILE: list[Hostile] = [
    ("text: 'On ' x 6000", _text_mail("On " * 6_000)),
    ("text: 'On' + 20,000 spaces + 'x'", _text_mail("On" + " " * 20_000 + "x")),
    (
        "text: 100 KB of 'On a a a ...' lines, no 'wrote:'",
        _text_mail(("On " + "a " * 498 + "\n") * 100),
    ),
    ("header: Content-Type with 20,000 ';'", _semicolons),
    ("header: Subject of 20,000 encoded words", _encoded_subject),
    ("mime: 30,000 parts", _many_parts),
    ("mime: 2,000 levels deep", _deep_nesting),
    ("mime: 19 levels, 1.7 million short lines", _nested_short_lines),
]


# ---------------------------------------------------------------- measuring a real server


@dataclass(frozen=True)
class Figure:
    """One hostile mail against a real server: its webhook's answer, `/healthz` meanwhile."""

    name: str
    message_id: str
    status: int
    seconds: float
    healthz_max_s: float
    healthz_polls: int


class HealthzProbe(threading.Thread):
    """Polls `/healthz` back to back from its own thread and records each latency."""

    def __init__(self, base_url: str, timeout_s: float = 300.0) -> None:
        super().__init__(daemon=True)
        self._base_url, self._timeout_s = base_url, timeout_s
        self._done = threading.Event()
        self.samples: list[tuple[float, float]] = []  # (sent, answered), monotonic seconds

    def run(self) -> None:
        with httpx.Client(base_url=self._base_url, timeout=self._timeout_s) as client:
            while not self._done.is_set():
                sent = time.monotonic()
                with contextlib.suppress(httpx.HTTPError):
                    client.get("/healthz")
                self.samples.append((sent, time.monotonic()))
                self._done.wait(0.01)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def during(self, start: float, end: float) -> list[float]:
        """Latencies of the polls that overlapped [start, end]."""
        return [b - a for a, b in self.samples if b >= start and a <= end]

    def percentile(self, fraction: float) -> float:
        latencies = sorted(b - a for a, b in self.samples)
        return latencies[min(len(latencies) - 1, int(fraction * len(latencies)))]


def send_hostile(
    base_url: str, mails: list[Hostile] = HOSTILE
) -> tuple[list[Figure], HealthzProbe]:
    """Post each hostile mail once, in turn, while a probe polls `/healthz`."""
    probe = HealthzProbe(base_url)
    probe.start()
    figures = []
    run = secrets.token_hex(4)
    try:
        with httpx.Client(base_url=base_url, timeout=300) as client:
            for index, (name, build) in enumerate(mails):
                message_id = f"<hostile-{run}-{index}@example.com>"
                headers, body = request_of(build(message_id))
                time.sleep(0.1)  # a few polls between mails
                start = time.monotonic()
                response = client.post(INBOUND, headers=headers, content=body)
                end = time.monotonic()
                time.sleep(0.1)
                during = probe.during(start, end) or [0.0]
                figures.append(
                    Figure(
                        name,
                        message_id,
                        response.status_code,
                        end - start,
                        max(during),
                        len(during),
                    )
                )
    finally:
        probe.stop()
    return figures, probe


def report(figures: list[Figure], probe: HealthzProbe) -> str:
    lines = [f"{'mail':<48} {'status':>6} {'webhook s':>10} {'healthz max s':>14}"]
    lines += [
        f"{f.name:<48} {f.status:>6} {f.seconds:>10.2f} {f.healthz_max_s:>14.3f}" for f in figures
    ]
    lines.append(
        f"/healthz over the run: {len(probe.samples)} polls, p99 {probe.percentile(0.99):.3f} s, "
        f"max {probe.percentile(1.0):.3f} s"
    )
    return "\n".join(lines)


def server_env(database_url: str, fakes_url: str, **extra: str) -> dict[str, str]:
    """`parley serve` wired to the fake providers, taking Inbound Parse with the fixtures'
    credentials."""
    return parley_env(
        DATABASE_URL=database_url,
        PUBLIC_BASE_URL="https://parley.example.com",
        SENDGRID_INBOUND_USER="parley",
        SENDGRID_INBOUND_PASSWORD="inbound-secret",
        SENDGRID_API_KEY="SG.test-key",
        SENDGRID_API_BASE_URL=fakes_url,
        OPENAI_API_KEY="test-key",
        OPENAI_BASE_URL=fakes_url + "/v1",
        OPENAI_MODEL="gpt-test",
        LOG_LEVEL="INFO",
        **extra,
    )
