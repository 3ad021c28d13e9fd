"""The WhatsApp plugin's pure rules: which Twilio channel a form belongs to, how its addresses
and ProfileName are stored, the 24-hour window, the template's variables, and `read` in the
forward-only delivery order. No I/O."""

from __future__ import annotations

import datetime as dt

import pytest

from service.channels.base import InvalidWebhook
from service.channels.twilio import webhook
from service.channels.twilio.base import TwilioChannel
from service.channels.twilio.sms import TwilioSms
from service.channels.twilio.whatsapp import (
    WINDOW,
    Send,
    TwilioWhatsApp,
    how_to_send,
    template_variables,
)
from service.types import DELIVERY_RANK, Channel, Delivery, Intent

SID = "SM" + "0123456789abcdef" * 2
NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def _form(**fields: str) -> dict[str, str]:
    return {
        "MessageSid": SID,
        "From": "whatsapp:+15550001111",
        "To": "whatsapp:+15559990000",
        "Body": "hi",
        "ProfileName": "Ana",
        **fields,
    }


@pytest.mark.parametrize(
    ("from_", "to", "owner"),
    [
        ("whatsapp:+15550001111", "whatsapp:+15559990000", TwilioWhatsApp),
        ("WhatsApp:+15550001111", "whatsapp:+15559990000", TwilioWhatsApp),
        ("+15550001111", "+15559990000", TwilioSms),
    ],
)
def test_a_form_belongs_to_the_channel_of_its_address_prefix(
    from_: str, to: str, owner: type[TwilioChannel]
) -> None:
    assert TwilioChannel.owner_of({"From": from_, "To": to}) is owner


@pytest.mark.parametrize(
    ("from_", "to"),
    [("whatsapp:+15550001111", "+15559990000"), ("fax:+15550001111", "fax:+15559990000")],
)
def test_mixed_or_unknown_prefixes_are_refused(from_: str, to: str) -> None:
    with pytest.raises(InvalidWebhook):
        TwilioChannel.owner_of({"From": from_, "To": to})


def test_a_whatsapp_form_is_stored_as_e164_with_its_profile_name() -> None:
    inbound = TwilioWhatsApp.parse_inbound(_form(ProfileName="  Ana\n Lima "))
    assert inbound.channel is Channel.WHATSAPP
    assert (inbound.remote_address, inbound.local_address) == ("+15550001111", "+15559990000")
    assert inbound.display_name == "Ana Lima"
    assert TwilioWhatsApp.parse_inbound(_form(ProfileName="")).display_name is None


@pytest.mark.parametrize(
    ("body", "opt_out_type", "intent"),
    [
        ("STOP", None, Intent.OPT_OUT),
        ("start", None, Intent.OPT_IN),
        ("HELP", None, Intent.HELP),
        ("please stop it", "STOP", Intent.OPT_OUT),
    ],
)
def test_whatsapp_opt_out_keywords_and_opt_out_type_are_sms_rules(
    body: str, opt_out_type: str | None, intent: Intent
) -> None:
    fields = {"Body": body, **({"OptOutType": opt_out_type} if opt_out_type else {})}
    assert TwilioWhatsApp.parse_inbound(_form(**fields)).intent is intent


def test_status_callbacks_of_whatsapp_messages_name_the_whatsapp_channel() -> None:
    form = {"MessageSid": SID, "MessageStatus": "read", "From": "whatsapp:+15559990000"}
    form["To"] = "whatsapp:+15550001111"
    update = webhook.parse_status(form, TwilioChannel.owner_of(form).channel)
    assert (update.status, update.channel) == (Delivery.READ, Channel.WHATSAPP)


def test_read_ranks_above_delivered_and_final_states_stay_final() -> None:
    assert DELIVERY_RANK[Delivery.READ] > DELIVERY_RANK[Delivery.DELIVERED]
    assert DELIVERY_RANK[Delivery.READ] == DELIVERY_RANK[Delivery.FAILED]
    assert DELIVERY_RANK[Delivery.READ] == DELIVERY_RANK[Delivery.UNDELIVERED]


@pytest.mark.parametrize(
    ("last_inbound_at", "template_sid", "how"),
    [
        (NOW - dt.timedelta(minutes=5), None, Send.FREE_FORM),
        (NOW - WINDOW, None, Send.FREE_FORM),
        (NOW - WINDOW - dt.timedelta(seconds=1), None, Send.REFUSE),
        (NOW - WINDOW - dt.timedelta(seconds=1), "HX" + "0" * 32, Send.TEMPLATE),
        (None, None, Send.REFUSE),
        (None, "HX" + "0" * 32, Send.TEMPLATE),
    ],
)
def test_free_form_only_within_24_hours_of_the_persons_last_message(
    last_inbound_at: dt.datetime | None, template_sid: str | None, how: Send
) -> None:
    assert how_to_send(last_inbound_at, NOW, template_sid) is how


def test_the_template_carries_the_first_thousand_characters() -> None:
    assert template_variables("a" * 1500) == {"1": "a" * 1000}
    assert template_variables("short") == {"1": "short"}


def test_after_twilio_s_63016_only_a_newer_message_from_the_person_reopens_free_form() -> None:
    now = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC)
    last = now - dt.timedelta(hours=1)
    assert how_to_send(last, now, "HX1", closed_at=None) is Send.FREE_FORM
    assert how_to_send(last, now, "HX1", closed_at=now - dt.timedelta(minutes=1)) is Send.TEMPLATE
    assert how_to_send(last, now, None, closed_at=now - dt.timedelta(minutes=1)) is Send.REFUSE
    reopened = how_to_send(last, now, "HX1", closed_at=last - dt.timedelta(minutes=1))
    assert reopened is Send.FREE_FORM
