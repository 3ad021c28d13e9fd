"""Storable text (SPEC §9): what `service.storable` makes of hostile values. Pure rules; the
same values through the webhooks are in tests/acceptance/test_storable_webhooks.py."""

from __future__ import annotations

import hashlib
import math

import pytest

from service import storable
from service.types import Channel, Inbound

# ------------------------------------------------------------------ the pure rules


def test_bodies_keep_tab_and_line_breaks_and_lose_other_controls() -> None:
    assert storable.text("a\tb\r\nc\n\x00d\x07\x1b\x7f\x85\x9fe") == "a\tb\r\nc\nde"


def test_lone_surrogates_become_replacement_characters_and_split_pairs_join() -> None:
    assert storable.text("a\ud800b\udfffc") == "a\ufffdb\ufffdc"
    assert storable.text("smile \ud83d\ude00") == "smile \U0001f600"
    assert storable.text("a\ud800b\udfffc").encode("utf-8")  # encodable at last


def test_lines_lose_every_control_and_are_cut_at_a_space() -> None:
    assert storable.line(" Re:\r\n\tHi\x00 there\x1b ", 100) == "Re: Hi there"
    assert storable.line("one two three", 9) == "one two"
    assert storable.line("x" * 20, 9) == "x" * 9


def test_a_long_provider_id_is_a_stable_digest_and_a_short_one_is_kept() -> None:
    long_id = "<" + "x" * 300 + "@mail.example.com>"
    digest = storable.provider_id(long_id)
    assert digest == "sha256:" + hashlib.sha256(long_id.encode()).hexdigest()
    assert storable.provider_id(long_id) == digest and len(digest) <= storable.MAX_PROVIDER_ID
    assert storable.provider_id(" <a\x00b@c>\r\n") == "<ab@c>"
    assert storable.provider_id("x" * 255) == "x" * 255


def test_addresses_over_320_characters_or_empty_are_refused() -> None:
    assert storable.address("+1555\x000001111", "From") == "+15550001111"
    assert storable.address("a" * 320, "From") == "a" * 320
    with pytest.raises(storable.Unstorable, match="From has 321 characters, more than 320"):
        storable.address("a" * 321, "From")
    with pytest.raises(storable.Unstorable, match="From is empty"):
        storable.address("\x00\t", "From")


def test_json_documents_hold_only_clean_strings_and_finite_numbers() -> None:
    value = {"k\x00": ["a\r\nb", 3, math.nan, {"n": math.inf, "ok": True, "none": None}]}
    assert storable.json_value(value) == {
        "k": ["a b", 3, None, {"n": None, "ok": True, "none": None}]
    }


def test_an_inbound_is_made_storable_in_every_field() -> None:
    message = Inbound(
        channel=Channel.EMAIL,
        provider_message_id="<" + "i" * 400 + "@x>",
        remote_address="alice\x00@example.com",
        local_address="assistant@parley.example.com\r\n",
        body="hello\x00\r\nworld\ud800",
        subject="Hi\r\n\x1bthere" + "s" * 2000,
        headers={"Message-ID": "<a\r\nb@x>", "References": "<r1@x>\x00 <r2@x>"},
        meta={"attachments": [{"name": "a\x00.png", "size": 3}]},
    )
    clean = storable.inbound(message)
    assert clean.provider_message_id == storable.provider_id(message.provider_message_id)
    assert (clean.remote_address, clean.local_address) == (
        "alice@example.com",
        "assistant@parley.example.com",
    )
    assert clean.body == "hello\r\nworld\ufffd"
    assert clean.subject == ("Hi there" + "s" * 2000)[: storable.MAX_SUBJECT]
    assert clean.headers == {"Message-ID": "<a b@x>", "References": "<r1@x> <r2@x>"}
    assert clean.meta == {"attachments": [{"name": "a.png", "size": 3}]}
