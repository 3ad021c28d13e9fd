"""Which mail is automatic (RFC 3834, PEERS "auto-reply loops"): each rule on its own, on a
mail that is otherwise an ordinary person's, so removing any one rule fails its case."""

from __future__ import annotations

from email import message_from_string, policy
from email.message import EmailMessage

import pytest

from service.channels.sendgrid.mime import is_automatic, is_unanswerable_address

OURS = "assistant@parley.example.com"
PERSON = "alice@example.com"


def mail(headers: dict[str, str], content_type: str = "text/plain") -> EmailMessage:
    lines = [f"From: {PERSON}", f"To: {OURS}", "Subject: Hello", f"Content-Type: {content_type}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    message = message_from_string(
        "\r\n".join(lines) + "\r\n\r\nHi there\r\n", policy=policy.default
    )
    assert isinstance(message, EmailMessage)
    return message


def test_an_ordinary_mail_is_not_automatic() -> None:
    assert not is_automatic(mail({}), PERSON, OURS)
    assert not is_automatic(mail({"Auto-Submitted": "no"}), PERSON, OURS)
    assert not is_automatic(mail({"Precedence": "first-class"}), PERSON, OURS)


@pytest.mark.parametrize(
    "headers",
    [
        {"Auto-Submitted": "auto-replied"},
        {"Auto-Submitted": "auto-generated"},
        {"Precedence": "bulk"},
        {"Precedence": "junk"},
        {"Precedence": "List"},
        {"X-Autoreply": "yes"},
        {"X-Autorespond": "vacation"},
        {"List-Id": "<news.example.com>"},
    ],
    ids=lambda headers: ",".join(f"{k}={v}" for k, v in headers.items()),
)
def test_each_automatic_header_alone_makes_a_mail_automatic(headers: dict[str, str]) -> None:
    assert is_automatic(mail(headers), PERSON, OURS)


def test_a_delivery_report_is_automatic() -> None:
    report = mail({}, 'multipart/report; report-type=delivery-status; boundary="b"')
    assert is_automatic(report, PERSON, OURS)


def test_mail_from_our_own_address_is_automatic() -> None:
    assert is_automatic(mail({}), OURS, OURS)


@pytest.mark.parametrize(
    "sender",
    [
        "MAILER-DAEMON@mx.example.com",
        "postmaster@example.com",
        "noreply@shop.example",
        "no-reply@accounts.example",
        "no_reply@bank.example",
        "do-not-reply@tickets.example",
        "DoNotReply@tickets.example",
        "noreply+orders@shop.example",
        "noreply-notifications@git.example",
        "bounce@list.example",
        "bounces+123-alice=example.com@list.example",
        "bounce-4417@mail.example",
        "parley-users-bounces@lists.example",
    ],
)
def test_system_no_reply_and_bounce_senders_are_automatic(sender: str) -> None:
    assert is_unanswerable_address(sender)
    assert is_automatic(mail({}), sender.lower(), OURS)


@pytest.mark.parametrize(
    "sender",
    [
        "alice@example.com",
        "bouncer@club.example",
        "norah@example.com",
        "reply@x.example",
        "jo.bouncewell@example.com",
    ],
)
def test_people_whose_names_look_alike_are_answered(sender: str) -> None:
    assert not is_unanswerable_address(sender)
    assert not is_automatic(mail({}), sender, OURS)
