"""The channel registry and the plugins' pure rules: addresses, status mapping, splitting,
display names, and which plugin owns which webhook (the address cases of `parley forget` moved
here from test_api). No I/O: plugins built from settings open nothing until they send."""

from __future__ import annotations

import pytest

from service.channels.base import BadAddress, InvalidWebhook
from service.channels.registry import Channels, build_channels
from service.channels.sendgrid.email import SendGridEmail
from service.channels.twilio import webhook
from service.channels.twilio.sms import SMS_MAX_CHARS, TwilioSms
from service.settings import Settings
from service.types import Channel, Delivery, Intent, Outbound

SID = "SM" + "0123456789abcdef" * 2


def _settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "twilio_account_sid": None,
        "twilio_auth_token": None,
        "sendgrid_api_key": None,
        "public_base_url": None,
        "_env_file": None,
    }
    return Settings(**{**values, **overrides})  # type: ignore[arg-type]


@pytest.fixture
def channels() -> Channels:
    return build_channels(_settings())


# ---------------------------------------------------------------- the registry


def test_the_registry_holds_one_plugin_per_channel(channels: Channels) -> None:
    assert set(channels) == set(Channel)
    assert all(channels[c].channel is c for c in Channel)


@pytest.mark.parametrize(
    ("channel", "name"),
    [
        (Channel.SMS, "SMS"),
        ("sms", "SMS"),
        ("whatsapp", "WhatsApp"),
        ("email", "Email"),
        ("fax", "fax"),
    ],
)
def test_display_names(channels: Channels, channel: str, name: str) -> None:
    assert channels.display_name(channel) == name


def test_each_webhook_is_owned_by_the_plugin_its_metrics_are_labelled_with(
    channels: Channels,
) -> None:
    owned = {(route.path, route.kind): plugin.channel for plugin, route in channels.routes()}
    assert owned == {
        ("/webhooks/twilio/sms", "message"): Channel.SMS,
        ("/webhooks/twilio/status", "status"): Channel.SMS,
        ("/webhooks/twilio/whatsapp", "message"): Channel.WHATSAPP,
        ("/webhooks/sendgrid/inbound", "message"): Channel.EMAIL,
    }


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("+15550001111", "+15550001111"),
        (" +1 555-000-1111 ", "+15550001111"),
        ("+44 7911 123456", "+447911123456"),
        ("Alice@Example.COM", "alice@example.com"),
        ("Alice Smith <ALICE@example.com>", "alice@example.com"),
        ("whatsapp:+15550001111", "+15550001111"),
        (" WhatsApp:+1 555 000 1111", "+15550001111"),
    ],
)
def test_addresses_are_normalised_by_the_plugin_that_claims_them(
    channels: Channels, given: str, normal: str
) -> None:
    assert channels.normalise_address(given) == normal


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("5550001111", "international form"),
        ("hello", "international form"),
        ("+1", "international form"),
        ("+1 555", "not a possible phone number"),
        ("@example.com", "not an email address"),
        ("a@b", "not an email address"),
        ("whatsapp:5550001111", "international form"),
        ("fax:+15550001111", "not an address of any channel"),
    ],
)
def test_unusable_addresses_are_refused_with_the_reason(
    channels: Channels, given: str, why: str
) -> None:
    with pytest.raises(BadAddress, match=why):
        channels.normalise_address(given)


def test_without_credentials_no_channel_can_send(channels: Channels) -> None:
    assert not any(plugin.can_send for plugin in channels.values())


async def test_with_credentials_a_channel_can_send_and_closing_opens_nothing() -> None:
    channels = build_channels(
        _settings(twilio_account_sid="AC" + "0" * 32, twilio_auth_token="t", sendgrid_api_key="k")
    )
    assert all(plugin.can_send for plugin in channels.values())
    await channels.close()  # no client was made: nothing to close, nothing fails


# ---------------------------------------------------------------- limits and splitting


def test_an_sms_reply_is_cut_at_words_within_the_limit() -> None:
    sms = TwilioSms(_settings())
    text = " ".join(["word"] * 1000)  # 4,999 characters
    parts = sms.split(text)
    assert sms.max_chars == SMS_MAX_CHARS == 1600
    assert len(parts) == 4 and all(len(p) <= 1600 for p in parts)
    assert " ".join(parts) == text


def test_an_email_reply_goes_out_whole() -> None:
    email = SendGridEmail(_settings())
    text = "x " * 5000
    assert email.max_chars is None
    assert email.split(f"  {text}  ") == [text.strip()]


def test_each_channel_has_its_own_style_line(channels: Channels) -> None:
    assert "SMS" in channels[Channel.SMS].style
    assert "email" in channels[Channel.EMAIL].style


def test_the_status_callback_url_is_the_plugins_status_route() -> None:
    sms = TwilioSms(_settings(public_base_url="https://parley.example.com"))
    assert sms.status_callback_url() == "https://parley.example.com/webhooks/twilio/status"
    assert TwilioSms(_settings()).status_callback_url() is None
    reached = Outbound(Channel.SMS, "+15550001111", "+15559990000", "hi", reached_at="http://h:8")
    assert (
        TwilioSms(_settings()).status_callback_url(reached) == "http://h:8/webhooks/twilio/status"
    )
    assert sms.status_callback_url(reached) == "https://parley.example.com/webhooks/twilio/status"


# ---------------------------------------------------------------- Twilio's forms


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("accepted", Delivery.QUEUED),
        ("queued", Delivery.QUEUED),
        ("sending", Delivery.QUEUED),
        ("sent", Delivery.SENT),
        ("delivered", Delivery.DELIVERED),
        ("read", Delivery.READ),
        ("undelivered", Delivery.UNDELIVERED),
        ("failed", Delivery.FAILED),
        ("canceled", Delivery.FAILED),
        (" Delivered ", Delivery.DELIVERED),
    ],
)
def test_twilio_statuses_map_onto_parleys_delivery_states(raw: str, status: Delivery) -> None:
    update = webhook.parse_status({"MessageSid": SID, "MessageStatus": raw})
    assert (update.provider_message_id, update.status, update.error) == (SID, status, None)


def test_a_status_error_names_twilios_code_and_message() -> None:
    form = {"SmsSid": SID, "SmsStatus": "undelivered", "ErrorCode": "30003", "ErrorMessage": "x"}
    assert webhook.parse_status(form).error == "Twilio error 30003: x"
    assert webhook.parse_status({**form, "ErrorCode": "0"}).error is None


@pytest.mark.parametrize(
    "form",
    [
        {"MessageSid": SID, "MessageStatus": "teleported"},
        {"MessageStatus": "sent"},
        {"MessageSid": "SM123", "MessageStatus": "sent"},
    ],
)
def test_an_unusable_status_callback_is_refused(form: dict[str, str]) -> None:
    with pytest.raises(InvalidWebhook):
        webhook.parse_status(form)


def test_an_inbound_form_is_read_for_the_channel_it_came_to() -> None:
    form = {"MessageSid": SID, "From": "+1 555 000 1111", "To": "+15550002222", "Body": "STOP"}
    inbound = webhook.parse_inbound(form, Channel.SMS)
    assert inbound.channel is Channel.SMS
    assert (inbound.remote_address, inbound.local_address) == ("+15550001111", "+15550002222")
    assert inbound.intent is Intent.OPT_OUT


def test_the_inbound_addresses_are_read_by_the_channels_rule() -> None:
    """A Twilio channel whose addresses are not bare numbers (`whatsapp:+1…`) keeps its form:
    phonenumbers would read the digits out of it and merge it with the SMS conversation."""
    form = {"MessageSid": SID, "From": "x:+1 555 000 1111", "To": "x:+15550002222", "Body": "hi"}
    assert webhook.parse_inbound(form, Channel.SMS).remote_address == "+15550001111"
    kept = webhook.parse_inbound(form, Channel.SMS, lambda raw: raw.replace(" ", ""))
    assert (kept.remote_address, kept.local_address) == ("x:+15550001111", "x:+15550002222")
