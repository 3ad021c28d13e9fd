"""Hostile Twilio requests through the app over HTTP, on SQLite and PostgreSQL (SPEC §9): bad
bytes are cleaned before they are stored; foreign, misshapen and re-cut requests are refused
with nothing stored; a redelivery never leaves an empty conversation; a value the database
refuses is a 400 and a database that is away a 503, each with one warning line, never a 500.
Every request is correctly signed, so each refusal is Parley's own decision."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from twilio.request_validator import RequestValidator

from service.models import DeliveryReport, Message
from service.testing import sign
from tests.conftest import (
    PUBLIC_BASE_URL,
    TWILIO_TOKEN,
    SettingsFactory,
    _pg_admin,
    running_app,
)
from tests.helpers import (
    conversations,
    messages,
    one_warning,
    post_twilio,
    recording,
    replay,
    rows,
    twilio_form,
)

TEXTER = "+15550001111"
OUR_NUMBER = "+15559990000"
SMS = "/webhooks/twilio/sms"
STATUS = "/webhooks/twilio/status"
OUTBOUND_SID = "SM" + "f" * 32  # the status fixtures' sid


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING)
    return caplog


def silent_settings(make_settings: SettingsFactory, **overrides: Any) -> Any:
    """No embedded worker: only the webhook writes, and only the webhook logs."""
    return make_settings(embedded_worker=False, **overrides)


async def user_messages(engine: AsyncEngine) -> list[Any]:
    return await messages(engine, Message.sender == "user")


async def nothing_stored(engine: AsyncEngine) -> bool:
    return not await conversations(engine) and not await messages(engine)


async def post_raw(client: httpx.AsyncClient, body: str, path: str = SMS) -> httpx.Response:
    """A form body sent as given, signed over what the server will parse from it."""
    params = dict(parse_qsl(body, keep_blank_values=True))
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": sign(TWILIO_TOKEN, PUBLIC_BASE_URL + path, params),
    }
    return await client.post(path, content=body, headers=headers)


# ------------------------------------------------------------------ cleaned, then stored


@pytest.mark.parametrize(
    ("fields", "body", "remote", "local"),
    [
        ({"Body": "hi\x00 there"}, "hi there", TEXTER, OUR_NUMBER),
        ({"Body": "a\x01\x07\x08\x0b\x0c\x1b[31mb\x7f\x85\x9fc"}, "a[31mbc", TEXTER, OUR_NUMBER),
        ({"Body": "tab\tline\r\nnext\n"}, "tab\tline\r\nnext\n", TEXTER, OUR_NUMBER),
        ({"From": "+1555000\x001111"}, "Hello there", TEXTER, OUR_NUMBER),
        ({"To": "+1555\r\n999\x000000\t"}, "Hello there", TEXTER, OUR_NUMBER),
    ],
    ids=["nul-in-body", "controls-in-body", "line-breaks-kept", "nul-in-from", "controls-in-to"],
)
async def test_control_characters_are_removed_before_storing(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    fields: dict[str, str],
    body: str,
    remote: str,
    local: str,
) -> None:
    form = twilio_form(**fields)
    async with running_app(silent_settings(make_settings)) as client:
        response = await post_twilio(client, form)

    assert response.status_code == 200, response.text
    [conversation] = await conversations(engine)
    assert (conversation.remote_address, conversation.local_address) == (remote, local)
    assert conversation.summary == " ".join(body.split())
    [message] = await user_messages(engine)
    assert (message.body, message.provider_message_id) == (body, form["MessageSid"])


async def test_invalid_utf8_in_a_percent_escape_is_stored_as_replacement_characters(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    form = twilio_form(Body=None)
    async with running_app(silent_settings(make_settings)) as client:
        response = await post_raw(client, urlencode(form) + "&Body=hi%ED%A0%80there")

    assert response.status_code == 200, response.text
    [message] = await user_messages(engine)
    assert message.body == "hi\ufffd\ufffd\ufffdthere"


async def test_media_urls_are_stored_without_control_characters(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    url = "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1"
    form = twilio_form("twilio/sms_mms.json", MediaUrl0=url[:30] + "\x00\r\n" + url[30:])
    async with running_app(silent_settings(make_settings)) as client:
        response = await post_twilio(client, form)

    assert response.status_code == 200, response.text
    [message] = await user_messages(engine)
    assert message.headers is None
    assert [m["url"] for m in message.media] == [url[:30] + " " + url[30:]]


# ------------------------------------------------------------------ refused, nothing stored


SID_FIELDS = ("MessageSid", "SmsSid", "SmsMessageSid")


def sids(value: str) -> dict[str, str]:
    return dict.fromkeys(SID_FIELDS, value)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"From": "+1" + "5" * 398}, "the sender address has 400 characters, more than 320"),
        ({"To": "x" * 400}, "the recipient address has 400 characters, more than 320"),
        ({"From": "\x00\x07"}, "the sender address is empty"),
        (sids("SM" + "a" * 4998), "MessageSid is not a Twilio message sid"),
        ({"SmsSid": "SM" + "0" * 4998}, "SmsSid is not a Twilio message sid"),
        (sids("SM" + "A" * 32), "MessageSid is not a Twilio message sid"),
        (sids("SM" + "a" * 32 + "\n"), "MessageSid is not a Twilio message sid"),
        (sids("SM" + "a" * 31 + "\x00"), "MessageSid is not a Twilio message sid"),
        (sids("AC" + "a" * 32), "MessageSid is not a Twilio message sid"),
    ],
    ids=[
        "long-from",
        "long-to",
        "from-only-controls",
        "5000-char-sid",
        "5000-char-smssid",
        "uppercase-sid",
        "sid-with-newline",
        "sid-with-nul",
        "account-sid-as-message-sid",
    ],
)
async def test_unstorable_or_misshapen_messages_are_400_and_nothing_stored(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    logged: pytest.LogCaptureFixture,
    fields: dict[str, str],
    reason: str,
) -> None:
    async with running_app(silent_settings(make_settings)) as client:
        logged.clear()
        response = await post_twilio(client, twilio_form(**fields))

    assert response.status_code == 400
    assert reason in response.text
    one_warning(logged.records, reason)
    assert await nothing_stored(engine)


async def test_an_unknown_signature_algorithm_is_403_in_one_line_without_its_value(
    make_settings: SettingsFactory, engine: AsyncEngine, logged: pytest.LogCaptureFixture
) -> None:
    form = twilio_form()
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": sign(TWILIO_TOKEN, PUBLIC_BASE_URL + SMS, form),
        "X-Twilio-Webhooks-Signature-Settings": "algorithm=" + "A" * 60_000,
    }
    async with running_app(silent_settings(make_settings)) as client:
        logged.clear()
        response = await client.post(SMS, content=urlencode(form), headers=headers)

    assert response.status_code == 403
    line = one_warning(logged.records, "bad or missing X-Twilio-Signature")
    assert len(line) < 300  # twilio's validator used to log the header whole: a second line
    assert await nothing_stored(engine)


@pytest.mark.parametrize(
    ("path", "fixture"),
    [(SMS, "twilio/sms_hello.json"), (STATUS, "twilio/status_delivered.json")],
    ids=["message", "status"],
)
@pytest.mark.parametrize(
    "account_sid", ["AC" + "0" * 32, None], ids=["another-account", "no-account"]
)
async def test_a_request_for_another_account_is_403_and_nothing_stored(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    logged: pytest.LogCaptureFixture,
    path: str,
    fixture: str,
    account_sid: str | None,
) -> None:
    form = twilio_form(fixture, AccountSid=account_sid)
    async with running_app(silent_settings(make_settings)) as client:
        logged.clear()
        response = await post_twilio(client, form, path=path)

    assert response.status_code == 403
    one_warning(logged.records, "AccountSid is not TWILIO_ACCOUNT_SID")
    assert await nothing_stored(engine)
    assert await rows(engine, DeliveryReport) == []


async def test_without_twilio_account_sid_any_account_is_accepted(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    async with running_app(silent_settings(make_settings, twilio_account_sid=None)) as client:
        response = await post_twilio(client, twilio_form(AccountSid="AC" + "0" * 32))

    assert response.status_code == 200
    assert len(await user_messages(engine)) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("MessageSid", "SM" + "f" * 31),
        ("SmsSid", "SM" + "f" * 300),
        ("MessageSid", "SMffffffffffffffffffffffffffffffff\x00"),
    ],
    ids=["short-sid", "long-smssid", "sid-with-nul"],
)
async def test_a_status_callback_with_a_misshapen_sid_is_400_and_nothing_stored(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    logged: pytest.LogCaptureFixture,
    field: str,
    value: str,
) -> None:
    form = twilio_form(
        "twilio/status_undelivered.json", **{"MessageSid": OUTBOUND_SID, field: value}
    )
    async with running_app(silent_settings(make_settings)) as client:
        logged.clear()
        response = await post_twilio(client, form, path=STATUS)

    assert response.status_code == 400
    one_warning(logged.records, f"{field} is not a Twilio message sid")
    assert await rows(engine, DeliveryReport) == []


async def test_a_status_callback_error_is_stored_as_one_clean_line(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    form = twilio_form(
        "twilio/status_undelivered.json",
        MessageSid=OUTBOUND_SID,
        ErrorCode="300\x0003",
        ErrorMessage="Unknown\x00 destination\r\nhandset",
    )
    async with running_app(silent_settings(make_settings)) as client:
        response = await post_twilio(client, form, path=STATUS)

    assert response.status_code == 204
    [report] = await rows(engine, DeliveryReport)
    assert (report.provider_message_id, report.status) == (OUTBOUND_SID, "undelivered")
    assert report.error == "Twilio error 30003: Unknown destination handset"


# ------------------------------------------------------------------ the re-cut forgery


def recut(body: str, field: str, absorbed: str) -> str:
    """Move the field `absorbed` (the next key in signing order) into the end of `field`'s
    value. The signature concatenates sorted keys and values with no separator, so the
    concatenation, and with it the signature, is unchanged."""
    pairs = parse_qsl(body, keep_blank_values=True)
    tail = absorbed + dict(pairs)[absorbed]
    return urlencode([(k, v + tail if k == field else v) for k, v in pairs if k != absorbed])


@pytest.mark.parametrize(
    ("fixture", "field", "absorbed"),
    [
        ("twilio/sms_hello.json", "MessageSid", "NumMedia"),
        ("twilio/sms_hello.json", "SmsSid", "SmsStatus"),
        ("twilio/status_delivered.json", "MessageSid", "MessageStatus"),
    ],
    ids=["message-sid", "sms-sid", "status-callback"],
)
async def test_a_recut_signed_request_still_validates_but_is_refused(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    logged: pytest.LogCaptureFixture,
    fixture: str,
    field: str,
    absorbed: str,
) -> None:
    data = recording(fixture)
    forged = recut(data["body"], field, absorbed)
    params = dict(parse_qsl(forged, keep_blank_values=True))
    assert params[field].endswith(absorbed + dict(parse_qsl(data["body"]))[absorbed])
    url, signature = PUBLIC_BASE_URL + data["path"], data["headers"]["X-Twilio-Signature"]
    assert RequestValidator(TWILIO_TOKEN).validate(url, params, signature)
    headers = {k: v for k, v in data["headers"].items() if k.lower() != "content-length"}

    async with running_app(silent_settings(make_settings)) as client:
        logged.clear()
        response = await client.post(data["path"], content=forged, headers=headers)
        assert response.status_code == 400
        one_warning(logged.records, f"{field} is not a Twilio message sid")
        assert await nothing_stored(engine)
        assert await rows(engine, DeliveryReport) == []
        assert (await replay(client, fixture)).status_code in (200, 204)  # the original passes


# ------------------------------------------------------------------ redeliveries


@pytest.mark.parametrize(
    "changed", [{"From": "+15550009999"}, {"To": "+15559990001"}], ids=["from", "to"]
)
async def test_a_redelivery_naming_another_conversation_creates_none(
    make_settings: SettingsFactory, engine: AsyncEngine, changed: dict[str, str]
) -> None:
    form = twilio_form()
    async with running_app(silent_settings(make_settings)) as client:
        assert (await post_twilio(client, form)).status_code == 200
        assert (await post_twilio(client, {**form, **changed})).status_code == 200

    [conversation] = await conversations(engine)
    assert (conversation.remote_address, conversation.local_address) == (TEXTER, OUR_NUMBER)
    [message] = await user_messages(engine)
    assert (message.provider_message_id, message.conversation_id) == (
        form["MessageSid"],
        conversation.id,
    )


async def test_concurrent_redeliveries_naming_other_conversations_create_none(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    form, other = twilio_form(), twilio_form(From="+15550002222", Body="a new texter")
    variants = [form, *({**form, "From": f"+1555000900{i}"} for i in range(5)), other]
    async with running_app(silent_settings(make_settings)) as client:
        responses = await asyncio.gather(*(post_twilio(client, f) for f in variants))

    assert [r.status_code for r in responses] == [200] * len(variants)
    stored = await user_messages(engine)
    assert sorted(m.provider_message_id for m in stored) == sorted(
        [form["MessageSid"], other["MessageSid"]]
    )
    assert sorted(c.id for c in await conversations(engine)) == sorted(
        m.conversation_id for m in stored
    )  # every conversation holds a message


async def test_an_existing_conversation_survives_a_redelivery_into_it(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    first, second = twilio_form(), twilio_form(From="+15550002222")
    async with running_app(silent_settings(make_settings)) as client:
        assert (await post_twilio(client, first)).status_code == 200
        assert (await post_twilio(client, second)).status_code == 200
        redelivered = {**first, "From": "+15550002222"}  # lands in `second`'s conversation
        assert (await post_twilio(client, redelivered)).status_code == 200

    assert [(c.remote_address, c.local_address) for c in await conversations(engine)] == [
        (TEXTER, OUR_NUMBER),
        ("+15550002222", OUR_NUMBER),
    ]
    assert len(await user_messages(engine)) == 2


# ------------------------------------------------------------------ the database says no


def is_postgresql(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql"


SQLITE_REFUSAL = """
CREATE TRIGGER refuse_poison BEFORE INSERT ON message WHEN NEW.body LIKE '%poison%'
BEGIN SELECT RAISE(ABORT, 'poison refused'); END
"""
PG_REFUSAL = """
CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.body LIKE '%poison%' THEN
    RAISE EXCEPTION 'poison refused' USING ERRCODE = '{sqlstate}';
  END IF;
  RETURN NEW;
END $$
"""
PG_TRIGGER = """
CREATE TRIGGER refuse_poison BEFORE INSERT ON message
FOR EACH ROW EXECUTE FUNCTION refuse_poison()
"""


async def refuse_poisoned_bodies(engine: AsyncEngine, sqlstate: str) -> None:
    """Make the database itself refuse a row, as PostgreSQL refuses a NUL or an over-long
    value (SQLSTATE 22xxx) or a constraint does (23xxx); SQLite's trigger raises a constraint
    error. Nothing in Parley is replaced: the refusal comes from the database."""
    async with engine.begin() as connection:
        if is_postgresql(engine):
            await connection.execute(text(PG_REFUSAL.format(sqlstate=sqlstate)))
            await connection.execute(text(PG_TRIGGER))
        else:
            await connection.execute(text(SQLITE_REFUSAL))


@pytest.mark.parametrize("sqlstate", ["22001", "22021", "23514"])
async def test_a_row_the_database_refuses_is_400_and_its_batch_neighbours_are_stored(
    make_settings: SettingsFactory,
    engine: AsyncEngine,
    logged: pytest.LogCaptureFixture,
    sqlstate: str,
) -> None:
    if not is_postgresql(engine) and sqlstate != "23514":
        pytest.skip("SQLite raises one kind of refusal: a constraint error")
    await refuse_poisoned_bodies(engine, sqlstate)
    good = [twilio_form(Body=f"fine {i}", From=f"+1555000200{i}") for i in range(4)]
    poisoned = twilio_form(Body="poison")
    async with running_app(silent_settings(make_settings)) as client:
        logged.clear()
        responses = await asyncio.gather(
            *(post_twilio(client, f) for f in [*good[:2], poisoned, *good[2:]])
        )

    assert [r.status_code for r in responses] == [200, 200, 400, 200, 200]
    assert "the database refused a value" in responses[2].text
    one_warning(logged.records, "the database refused a value")
    stored = await user_messages(engine)
    assert sorted(m.body for m in stored) == [f"fine {i}" for i in range(4)]
    assert sorted(c.remote_address for c in await conversations(engine)) == [
        f"+1555000200{i}" for i in range(4)
    ]


async def make_unavailable(database_url: str) -> str:
    """A URL for this test's database as it is while the database is away: PostgreSQL refuses
    connections to it (and drops the ones open); SQLite's file cannot be opened."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        assert url.database
        return str(url.set(database=url.database + ".missing/parley.db"))
    await _pg_admin(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS false')
    await _pg_admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{url.database}' AND pid <> pg_backend_pid()"
    )
    return database_url


@pytest.mark.parametrize(
    ("path", "fixture", "fields"),
    [
        (SMS, "twilio/sms_hello.json", {}),
        (STATUS, "twilio/status_delivered.json", {"MessageSid": OUTBOUND_SID}),
    ],
    ids=["message", "status"],
)
async def test_while_the_database_is_unavailable_webhooks_answer_503(
    make_settings: SettingsFactory,
    database_url: str,
    logged: pytest.LogCaptureFixture,
    path: str,
    fixture: str,
    fields: dict[str, str],
) -> None:
    async with running_app(silent_settings(make_settings)) as client:
        assert (await post_twilio(client, twilio_form())).status_code == 200  # pool is warm
        away = await make_unavailable(database_url)
        if away != database_url:  # SQLite: a second app on the unopenable file
            async with running_app(silent_settings(make_settings, database_url=away)) as down:
                logged.clear()
                response = await post_twilio(down, twilio_form(fixture, **fields), path=path)
        else:
            logged.clear()
            response = await post_twilio(client, twilio_form(fixture, **fields), path=path)

    assert response.status_code == 503
    assert "the database is unavailable" in response.text
    one_warning(logged.records, "the database is unavailable")


async def test_after_a_database_restart_the_next_webhook_is_stored_not_refused(
    make_settings: SettingsFactory, database_url: str, engine: AsyncEngine
) -> None:
    if make_url(database_url).get_backend_name() != "postgresql":
        pytest.skip("a server restart drops pooled connections: a PostgreSQL case")
    async with running_app(silent_settings(make_settings)) as client:
        assert (await post_twilio(client, twilio_form(Body="before"))).status_code == 200
        await _pg_admin(  # what a restart does to every pooled connection
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{make_url(database_url).database}' AND pid <> pg_backend_pid()"
        )
        after = twilio_form(Body="after", From="+15550002222")
        assert (await post_twilio(client, after)).status_code == 200  # Twilio would not retry
    assert sorted(m.body for m in await user_messages(engine)) == ["after", "before"]


async def test_with_postgresql_not_listening_webhooks_answer_503(
    make_settings: SettingsFactory, database_url: str, logged: pytest.LogCaptureFixture
) -> None:
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        pytest.skip("a closed port is a PostgreSQL case")
    closed = url.set(host="127.0.0.1", port=1).render_as_string(hide_password=False)
    async with running_app(silent_settings(make_settings, database_url=closed)) as client:
        logged.clear()
        response = await post_twilio(client, twilio_form())

    assert response.status_code == 503
    one_warning(logged.records, "the database is unavailable (ConnectionRefusedError)")


async def test_a_recut_from_of_a_stored_message_is_a_duplicate_with_no_new_conversation(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    data = recording("twilio/sms_hello.json")
    forged = recut(data["body"], "From", "FromCity")  # From=+15550001111FromCitySAN FRANCISCO
    headers = {k: v for k, v in data["headers"].items() if k.lower() != "content-length"}
    async with running_app(silent_settings(make_settings)) as client:
        assert (await replay(client, "twilio/sms_hello.json")).status_code == 200
        assert (await client.post(data["path"], content=forged, headers=headers)).status_code == 200

    [conversation] = await conversations(engine)
    assert conversation.remote_address == TEXTER
    assert [m.conversation_id for m in await user_messages(engine)] == [conversation.id]
