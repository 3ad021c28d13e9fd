"""Generated hostile webhooks through the real app, on SQLite and PostgreSQL (SPEC §9).

Twilio forms are re-signed after every mutation, so they pass the signature and reach the
parser; SendGrid posts carry the right Basic credentials. The properties hold for every example:

- never a 5xx (the database is up, so no content may produce one);
- a refusal (4xx) stores nothing: no message and no conversation appear;
- a 2xx'd message is stored exactly once, and a redelivery of it stores nothing more;
- every mail Parley sends in answer has clean headers (no CR, LF or control characters).

The example budget is fixed and derandomised here (CI's share is about a minute per backend);
`bench/fuzz_webhooks.py` runs the same properties with a large random budget.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.models import Conversation, Message
from service.testing import sign
from tests.conftest import PUBLIC_BASE_URL, TWILIO_SID, TWILIO_TOKEN, SettingsFactory, running_app
from tests.fakes import FakeProviders
from tests.helpers import eventually, form_of, settled

EXAMPLES = int(os.environ.get("PARLEY_FUZZ_EXAMPLES", "150"))
RANDOM = os.environ.get("PARLEY_FUZZ_RANDOM") == "1"
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SMS_PATH = "/webhooks/twilio/sms"
STATUS_PATH = "/webhooks/twilio/status"
EMAIL_PATH = "/webhooks/sendgrid/inbound"
EMAIL_AUTH = httpx.BasicAuth("parley", "inbound-secret")
PARLEY = "assistant@parley.example.com"
UNIQUE = "UNIQUE-ID"  # replaced per run, so that generated mails never collide by accident
UNCLEAN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab aside, as header folding allows it

# ---------------------------------------------------------------- strategies

# Text that is valid UTF-8 (a form must be encodable) but otherwise anything: NUL, controls,
# RTL marks, combining characters, astral planes; and the lengths that break columns.
nasty_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=400),
    st.sampled_from(["\x00", "\r\n", "\u202e", "\ufeff", "STOP", " help! ", "On " * 2000]),
    st.integers(0, 5000).map(lambda n: "x" * n),
)
phone = st.one_of(
    st.just("+14155550123"),
    st.from_regex(r"\+1[2-9][0-9]{9}", fullmatch=True),
    st.sampled_from(["", " ", "whatsapp:+14155550123", "12345", "+" + "9" * 400, "a\x00b"]),
    nasty_text,
)
message_sid = st.one_of(
    st.binary(min_size=16, max_size=16).map(lambda b: "SM" + b.hex()),
    st.binary(min_size=16, max_size=16).map(lambda b: "MM" + b.hex()),
    st.binary(min_size=16, max_size=16).map(lambda b: "SM" + b.hex() + "NumMedia0"),
    nasty_text,
)
account_sid = st.one_of(st.just(TWILIO_SID), st.just("AC" + "0" * 32), nasty_text)


@st.composite
def twilio_forms(draw: st.DrawFn) -> dict[str, str]:
    """A recorded inbound SMS form with generated values in its fields, and extra fields."""
    form = form_of("twilio/sms_hello.json")
    sid = draw(message_sid)
    form.update(MessageSid=sid, SmsSid=sid, SmsMessageSid=sid)
    form["AccountSid"] = draw(account_sid)
    form["Body"] = draw(nasty_text)
    form["From"] = draw(phone)
    form["To"] = draw(st.one_of(st.just(form["To"]), phone))
    for name in draw(st.lists(st.sampled_from(sorted(form)), max_size=2)):
        if name not in ("MessageSid", "AccountSid"):
            form.pop(name, None)
    extra = draw(
        st.dictionaries(st.sampled_from(["NumMedia", "OptOutType", "MediaUrl0"]), nasty_text)
    )
    form.update(extra)
    return form


@st.composite
def status_forms(draw: st.DrawFn) -> dict[str, str]:
    sid = draw(message_sid)
    return {
        "MessageSid": sid,
        "SmsSid": sid,
        "AccountSid": draw(account_sid),
        "MessageStatus": draw(
            st.one_of(st.sampled_from(["sent", "delivered", "failed", "read"]), nasty_text)
        ),
        "ErrorCode": draw(st.one_of(st.just(""), st.just("30003"), nasty_text)),
        "From": "+14155550100",
        "To": draw(phone),
    }


header_value = st.one_of(
    st.text(alphabet=st.characters(codec="ascii"), max_size=80),
    st.sampled_from(
        [
            "=?utf-8?b?SGkNCkJjYzogdmljdGltQGV4YW1wbGUuY29t?=",  # "Hi\r\nBcc: victim@…"
            "=?utf-8?q?a=0D=0Ab?=",
            "=?x-unknown?b?AAAA?=",
            "text/plain; " + ";" * 2000,
            "multipart/mixed; boundary=",
            "<" + "a" * 400 + "@example.com>",
            "",
        ]
    ),
)
charset = st.sampled_from(["utf-8", "UTF-8", "iso-8859-1", "windows-1252", "x-nonsense", ""])


@st.composite
def mime_messages(draw: st.DrawFn, message_id: str) -> bytes:
    """A raw RFC 5322 mail: generated headers, charsets and MIME structure, some of it broken."""
    sender = draw(st.one_of(st.just("Alice <alice@example.com>"), header_value))
    subject = draw(st.one_of(st.just("Hello"), header_value))
    headers = [
        f"From: {sender}",
        f"To: {PARLEY}",
        f"Subject: {subject}",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
    ]
    headers += [f"{k}: {v}" for k, v in draw(st.dictionaries(st.sampled_from(
        ["In-Reply-To", "References", "Auto-Submitted", "Precedence", "X-Mailer"]), header_value,
        max_size=3)).items()]  # fmt: skip
    boundary = draw(st.sampled_from(["b1", "==x==", "", "a" * 70, "--"]))
    parts = draw(st.integers(0, 4))
    body_text = draw(nasty_text).encode("utf-8", "surrogatepass")
    if parts == 0:
        headers.append(f"Content-Type: text/plain; charset={draw(charset)}")
        encoding = draw(st.sampled_from(["8bit", "base64", "quoted-printable", "x"]))
        headers.append(f"Content-Transfer-Encoding: {encoding}")
        return ("\r\n".join(headers) + "\r\n\r\n").encode() + body_text
    subtype = draw(st.sampled_from(["mixed", "alternative", "report"]))
    headers.append(f'Content-Type: multipart/{subtype}; boundary="{boundary}"')
    chunks = [("\r\n".join(headers) + "\r\n\r\n").encode()]
    for _ in range(parts):
        kind = draw(st.sampled_from(["text/plain", "text/html", "image/png", "message/rfc822"]))
        part_headers = f"--{boundary}\r\nContent-Type: {kind}; charset={draw(charset)}\r\n\r\n"
        chunks.append(part_headers.encode())
        chunks.append(body_text if kind != "text/html" else b"<p>" + body_text + b"</p>")
        chunks.append(b"\r\n")
    if draw(st.booleans()):
        chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


@st.composite
def sendgrid_posts(draw: st.DrawFn) -> tuple[dict[str, bytes], str]:
    """The fields of an Inbound Parse post (parsed or raw mode) and its Message-ID."""
    message_id = f"<fuzz-{UNIQUE}@example.com>"
    envelope = draw(
        st.one_of(
            st.just(json.dumps({"to": [PARLEY], "from": "alice@example.com"})),
            st.just(json.dumps({"to": ["x" * 400 + "@example.com"], "from": "a@b"})),
            nasty_text,
        )
    )
    fields: dict[str, bytes] = {
        "envelope": envelope.encode(),
        "SPF": draw(st.sampled_from(["pass", "fail", "softfail", "none", ""])).encode(),
        "dkim": draw(
            st.sampled_from(["{@example.com : pass}", "none", "{@evil : fail}", ""])
        ).encode(),
        "charsets": draw(st.one_of(st.just('{"text": "utf-8"}'), nasty_text)).encode(),
    }
    if draw(st.booleans()):
        fields["email"] = draw(mime_messages(message_id))
    else:
        headers = (
            f"From: Alice <alice@example.com>\r\nTo: {PARLEY}\r\n"
            f"Message-ID: {message_id}\r\nSubject: {draw(header_value)}\r\n"
        )
        fields.update(
            headers=headers.encode(),
            from_=b"Alice <alice@example.com>",
            to=PARLEY.encode(),
            subject=draw(header_value).encode(),
        )
        fields[draw(st.sampled_from(["text", "html"]))] = draw(nasty_text).encode()
    return {k.rstrip("_"): v for k, v in fields.items()}, message_id


def multipart(fields: dict[str, bytes], boundary: str) -> bytes:
    chunks = []
    for name, value in fields.items():
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value
            + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


# ---------------------------------------------------------------- the app and its rows


@pytest.fixture
async def app_client(
    make_settings: SettingsFactory, providers: FakeProviders
) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(make_settings(reply_rate_limit="1000000/hour")) as http:
        yield http


async def counts(engine: AsyncEngine) -> tuple[int, int]:
    """The people's messages and the conversations (the worker adds replies meanwhile)."""
    async with engine.connect() as connection:
        messages = await connection.scalar(
            select(func.count()).select_from(Message).where(Message.sender == "user")
        )
        conversations = await connection.scalar(select(func.count()).select_from(Conversation))
    return int(messages or 0), int(conversations or 0)


async def stored_with_id(engine: AsyncEngine, provider_id: str) -> int:
    async with engine.connect() as connection:
        found = await connection.scalar(
            select(func.count())
            .select_from(Message)
            .where(Message.provider_message_id == provider_id)
        )
    return int(found or 0)


async def post_form(client: httpx.AsyncClient, path: str, form: dict[str, str]) -> httpx.Response:
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": sign(TWILIO_TOKEN, PUBLIC_BASE_URL + path, form),
    }
    return await client.post(path, content=urlencode(form), headers=headers)


def assert_no_5xx(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text)


# ---------------------------------------------------------------- properties


@FUZZ
@given(form=twilio_forms())
async def test_generated_sms_webhooks_never_5xx_nor_half_store(
    app_client: httpx.AsyncClient, engine: AsyncEngine, form: dict[str, str]
) -> None:
    before = await counts(engine)
    response = await post_form(app_client, SMS_PATH, form)
    assert_no_5xx(response)
    if response.status_code >= 400:
        assert await counts(engine) == before, "a refused SMS left rows behind"
        return
    assert response.status_code == 200
    sid = form["MessageSid"]
    assert await stored_with_id(engine, sid) == 1
    again = await post_form(app_client, SMS_PATH, form)
    assert again.status_code == 200
    assert await stored_with_id(engine, sid) == 1, "a redelivery was stored twice"


@FUZZ
@given(form=status_forms())
async def test_generated_status_callbacks_never_5xx(
    app_client: httpx.AsyncClient, engine: AsyncEngine, form: dict[str, str]
) -> None:
    before = await counts(engine)
    response = await post_form(app_client, STATUS_PATH, form)
    assert_no_5xx(response)
    assert await counts(engine) == before  # a callback never creates messages or conversations


@FUZZ
@given(post=sendgrid_posts(), boundary=st.sampled_from(["xYzZY", "----b", "a" * 70]))
async def test_generated_mail_never_5xx_nor_half_store(
    app_client: httpx.AsyncClient,
    engine: AsyncEngine,
    providers: FakeProviders,
    post: tuple[dict[str, bytes], str],
    boundary: str,
) -> None:
    unique = secrets.token_hex(8).encode()
    fields = {name: value.replace(UNIQUE.encode(), unique) for name, value in post[0].items()}
    sent_before = len(providers.sendgrid_sent)
    body = multipart(fields, boundary)
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    before = await counts(engine)
    response = await app_client.post(EMAIL_PATH, content=body, headers=headers, auth=EMAIL_AUTH)
    assert_no_5xx(response)
    after = await counts(engine)
    if response.status_code >= 400:
        assert after == before, "a refused mail left rows behind"
        return
    assert after[0] == before[0] + 1, "a 2xx'd mail was not stored exactly once"
    again = await app_client.post(EMAIL_PATH, content=body, headers=headers, auth=EMAIL_AUTH)
    assert again.status_code == 200
    assert await counts(engine) == after, "a redelivered mail was stored again"
    await eventually(lambda: settled(engine))
    for record in providers.sendgrid_sent[sent_before:]:
        assert_clean_mail(record["json"])


def assert_clean_mail(mail: dict[str, Any]) -> None:
    values = [mail.get("subject", ""), *mail.get("headers", {}).values(), mail["from"]["email"]]
    values += [p["email"] for person in mail["personalizations"] for p in person["to"]]
    for value in values:
        assert not UNCLEAN.search(str(value)), f"unclean outbound header value {value!r}"
