"""Issue 15's failure classes end to end: a real-shaped SendGrid Inbound Parse post (the
recorded `gmail_first` request with its text and HTML parts swapped) through the app to the
model's user turn, on each database backend."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.fakes import FakeProviders
from tests.helpers import eventually, recording, settled

BOUNDARY = "xYzZY"
INBOUND = "/webhooks/sendgrid/inbound"


def _parts(body: str) -> list[tuple[str, str]]:
    """(name, raw part) for each form field of a recorded parsed-mode post."""
    found = []
    for raw in body.split(f"--{BOUNDARY}")[1:]:
        if raw.startswith("--"):
            break
        name = raw.split('name="', 1)[1].split('"', 1)[0]
        found.append((name, raw))
    return found


def _field(name: str, value: str) -> str:
    return f'\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'


def mail(label: str, text: str | None, html: str | None) -> tuple[dict[str, str], bytes]:
    """The recorded Gmail post with new text/html parts and a Message-ID of its own."""
    data = recording("sendgrid/gmail_first.json")
    body = base64.b64decode(data["body_b64"]).decode("utf-8")
    fields = []
    for name, raw in _parts(body):
        if name in ("text", "html"):
            continue
        if name == "headers":
            raw = raw.replace("<CAF=first-alice@mail.gmail.com>", f"<{label}@mail.gmail.com>")
        fields.append(raw)
    if text is not None:
        fields.append(_field("text", text))
    if html is not None:
        fields.append(_field("html", html))
    payload = "".join(f"--{BOUNDARY}{raw}" for raw in fields) + f"--{BOUNDARY}--\r\n"
    headers = {k: v for k, v in data["headers"].items() if k.lower() != "content-length"}
    return headers, payload.encode("utf-8")


QUOTE = "On Tue, 24 Nov 2026 at 10:00, Parley <assistant@parley.example.com> wrote:"
CASES: dict[str, tuple[str | None, str | None, str]] = {
    "bottom_post": (
        f"Hi,\n\n{QUOTE}\n> Shall I book the museum for Saturday?\n\nYes, for two people.",
        None,
        "Hi,\n\nYes, for two people.",
    ),
    "inline": (
        f"{QUOTE}\n> Which day?\n\nSaturday\n\n> How many people?\n\nTwo",
        None,
        "Saturday\n\nTwo",
    ),
    "sign_off_sentence": (
        f"Hi,\n\nThanks, that fixed the login.\n\nHow do I change my address?\n\n{QUOTE}\n> Reset.",
        None,
        "Hi,\n\nThanks, that fixed the login.\n\nHow do I change my address?",
    ),
    "dash_list": (
        f"- yes please\n- and a taxi back at 11\n\n{QUOTE}\n> Shall I book dinner?",
        None,
        "- yes please\n- and a taxi back at 11",
    ),
    "forward": (
        "FYI, summarise please\n\n---------- Forwarded message ---------\n"
        "From: Bank <news@bank.example>\nSubject: Fees\n\nFees rise by 2% in March.",
        None,
        "FYI, summarise please\n\n[forwarded message]\n"
        "From: Bank <news@bank.example>\nSubject: Fees\n\nFees rise by 2% in March.",
    ),
    "language_pt": (
        "Obrigado, recebi.\n\nEm ter., 24 de nov. de 2026 às 10:00, Parley "
        "<assistant@parley.example.com> escreveu:\n\n> Segue o documento.",
        None,
        "Obrigado, recebi.",
    ),
    "html_structure": (
        "Tak, w piątek.\n\nwt., 24 lis 2026 o 10:00 Parley wrote something odd\n> Kiedy?",
        '<div dir="ltr">Tak, w piątek.</div><div class="gmail_quote"><div class="gmail_attr">'
        "wt., 24 lis 2026 o 10:00 Parley napisał(a):</div><blockquote class="
        '"gmail_quote">Kiedy?</blockquote></div>',
        "Tak, w piątek.",
    ),
}


@pytest.mark.parametrize("label", list(CASES))
async def test_the_model_reads_what_the_person_wrote(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders, label: str
) -> None:
    text, html, expected = CASES[label]
    headers, payload = mail(label, text, html)

    response = await client.post("/webhooks/sendgrid/inbound", headers=headers, content=payload)
    assert response.status_code == 200, response.text
    await eventually(lambda: settled(engine))

    turns: list[dict[str, Any]] = providers.openai_requests[-1]["messages"]
    assert turns[-1]["role"] == "user"
    assert turns[-1]["content"] == expected


async def test_a_quoted_copy_of_parleys_own_reply_is_removed_wherever_it_sits(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """No "On … wrote:", no `>`: only knowing what Parley itself wrote tells the copy apart."""
    providers.openai_reply = lambda _request: (
        "We have tables at 7 and at 9 on Saturday. Which one would you like me to book for you?"
    )
    headers, payload = mail("own-first", "Can you book us a table for Saturday?", None)
    assert (await client.post(INBOUND, headers=headers, content=payload)).status_code == 200
    await eventually(lambda: settled(engine))

    answer = (
        "Great, thanks.\n\n"
        "    We have tables at 7 and at 9 on Saturday. Which one would\n"
        "    you like me to book for you?\n\n"
        "The 9 o'clock one please."
    )
    headers, payload = mail("own-second", answer, None)
    assert (await client.post(INBOUND, headers=headers, content=payload)).status_code == 200
    await eventually(lambda: settled(engine))

    turns: list[dict[str, Any]] = providers.openai_requests[-1]["messages"]
    assert turns[-1] == {"role": "user", "content": "Great, thanks.\n\nThe 9 o'clock one please."}
    assert turns[-2]["role"] == "assistant" and turns[-2]["content"].startswith("We have tables")
