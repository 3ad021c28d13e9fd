"""Inbound Parse posts built from the recorded SendGrid fixtures with some fields changed, framed
exactly as the fixture script frames SendGrid's own (boundary `xYzZY`, part headers, CRLF), and
correctly authenticated. Also the hostile mails the tests and `bench/hostile_mail.py` send."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable

import httpx

from tests.fixtures.make_sendgrid_fixtures import Field, form_data, http_headers, read_with_email
from tests.helpers import recorded_body, recording

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
        b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(10_000)
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
        "text: 100 KB of 'On ... ' lines, no 'wrote:'",
        _text_mail(("On " + "Tue, 24 Nov 2026 a b c " * 40 + "\n") * 100),
    ),
    ("header: Content-Type with 20,000 ';'", _semicolons),
    ("header: Subject of 20,000 encoded words", _encoded_subject),
    ("mime: 10,000 parts", _many_parts),
    ("mime: 2,000 levels deep", _deep_nesting),
]
