"""Reading an Inbound Parse body as it streams in (`inbound.FormReader`): the same fields
however the body is cut into chunks, and only each field's kept bytes held, whatever its size."""

from __future__ import annotations

import itertools
import os
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.channels.sendgrid import inbound
from service.channels.sendgrid.limits import MAX_HTML_CHARS, MAX_MIME_BYTES, decode_text
from tests.fixtures.make_sendgrid_fixtures import Field, form_data
from tests.helpers import FIXTURES, recorded_body, recording

RECORDED = sorted(p.stem for p in (FIXTURES / "sendgrid").glob("*.json"))
CONTENT_TYPE = "multipart/form-data; boundary=xYzZY"


def recorded(name: str) -> tuple[bytes, str]:
    data = recording(f"sendgrid/{name}.json")
    return recorded_body(data), data["headers"]["Content-Type"]


def read(chunks: list[bytes], content_type: str = CONTENT_TYPE) -> dict[str, list[inbound.Part]]:
    reader = inbound.FormReader(content_type)
    for chunk in chunks:
        reader.feed(chunk)
    return reader.fields()


def cut(body: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted(p % (len(body) + 1) for p in points), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


@pytest.mark.parametrize("name", RECORDED)
@settings(max_examples=30, deadline=None)
@given(points=st.lists(st.integers(min_value=0), max_size=12))
def test_every_recorded_post_reads_the_same_however_it_is_cut(name: str, points: list[int]) -> None:
    body, content_type = recorded(name)
    assert read(cut(body, points), content_type) == read([body], content_type)


@settings(max_examples=30, deadline=None)
@given(points=st.lists(st.integers(min_value=0), max_size=12))
def test_a_bare_lf_post_reads_like_its_crlf_twin_however_it_is_cut(points: list[int]) -> None:
    fields = [Field("from", b"Alice <alice@example.com>"), Field("text", b"line one\nline two\n")]
    crlf = form_data(fields)
    bare = crlf.replace(b"\r\n", b"\n")  # SendGrid's sample sender frames with bare LF
    assert read(cut(bare, points)) == read([crlf])


def test_an_attachment_is_counted_not_kept_and_only_fields_that_are_read_are_kept() -> None:
    picture = os.urandom(300_000)
    fields = read(
        [
            form_data(
                [
                    Field("attachment1", picture, "photo.jpg", "image/jpeg"),
                    Field("text", b"hello"),
                    Field("text", b"a second text field: never read"),
                    Field("html", b"<p>" + b"h" * 2_000_000),
                    Field("notes", b"n" * 1_000_000),  # a field Parley does not read
                ]
            )
        ]
    )
    attachment = fields["attachment1"][0]
    assert (attachment.data, attachment.size) == (b"", 300_000)
    assert (attachment.filename, attachment.content_type) == ("photo.jpg", "image/jpeg")
    assert [(p.data, p.size) for p in fields["text"]] == [(b"hello", 5), (b"", 31)]
    html = fields["html"][0]
    assert (len(html.data), html.size) == (MAX_HTML_CHARS * 4, 2_000_003)
    notes = fields["notes"][0]
    assert (notes.data, notes.size) == (b"", 1_000_000)


def test_a_mail_without_message_id_keeps_the_id_it_had_before_posts_were_streamed() -> None:
    body, content_type = recorded("no_message_id")
    envelope = inbound.envelope_of(read([body], content_type))
    assert envelope.provider_message_id == (
        "<sha256-2cfaaa08699b58e5b4c309b4518c9af145336aa4@parley.invalid>"  # 3957529's
    )


def test_a_raw_mail_keeps_what_cap_mime_reads_and_digests_all_of_it() -> None:
    mail = b"Subject: big\r\n\r\n" + b"0123456789abcde\n" * (MAX_MIME_BYTES // 8)
    longer = mail + b"one more line\n"
    first = read([form_data([Field("email", mail)])])["email"][0]
    second = read([form_data([Field("email", longer)])])["email"][0]
    assert first.data == second.data == mail[: MAX_MIME_BYTES + 1]
    assert (first.size, second.size) == (len(mail), len(longer))
    assert first.digest != second.digest  # two mails without Message-ID stay two mails


def test_reading_a_30_mb_post_holds_its_kept_bytes_not_the_post() -> None:
    picture = os.urandom(28 * 1024 * 1024)
    body = form_data(
        [Field("text", b"see attached"), Field("attachment1", picture, "a.bin", "x/y")]
    )
    del picture
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    reader = inbound.FormReader(CONTENT_TYPE)
    tracemalloc.start()
    try:
        for chunk in chunks:
            reader.feed(chunk)
        fields = reader.fields()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fields["attachment1"][0].size == 28 * 1024 * 1024
    assert peak < 1024 * 1024  # the whole post held at once would be 28 MB


def test_a_start_of_only_line_breaks_is_passed_on_not_buffered() -> None:
    reader = inbound.FormReader(CONTENT_TYPE)
    line_breaks = b"\r\n" * 32_768
    tracemalloc.start()
    try:
        with pytest.raises(inbound.InvalidInbound):
            for _ in range(200):  # 13 MB
                reader.feed(line_breaks)
            reader.fields()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_a_bare_lf_post_is_buffered_only_up_to_a_mebibyte() -> None:
    reader = inbound.FormReader(CONTENT_TYPE)
    reader.feed(b'--xYzZY\nContent-Disposition: form-data; name="text"\n\n')
    with pytest.raises(inbound.InvalidInbound, match="bare LF"):
        for _ in range(20):
            reader.feed(b"x" * 65536)


def test_part_headers_padded_with_spaces_are_refused_at_the_first_long_one() -> None:
    padded = b"--xYzZY\r\nContent-Disposition:" + b" " * 4000 + b'form-data; name="a"\r\n\r\nv\r\n'
    reader = inbound.FormReader(CONTENT_TYPE)
    with pytest.raises(inbound.InvalidInbound, match="malformed multipart"):
        reader.feed(padded * 990 + b"--xYzZY--\r\n")


def test_a_boundary_python_multipart_refuses_is_a_refusal_not_a_crash() -> None:
    with pytest.raises(inbound.InvalidInbound, match="boundary"):
        inbound.FormReader("multipart/form-data; boundary=" + "b" * 300)


def test_a_body_that_is_not_multipart_is_refused_at_its_first_bytes() -> None:
    reader = inbound.FormReader(CONTENT_TYPE)
    with pytest.raises(inbound.InvalidInbound, match="malformed multipart"):
        reader.feed(b"x" * 70_000)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "multipart/form-data", "multipart/mixed; boundary=xYzZY"]
)
def test_a_form_without_a_boundary_is_refused_before_any_byte(content_type: str) -> None:
    with pytest.raises(inbound.InvalidInbound, match="boundary"):
        inbound.FormReader(content_type)


@pytest.mark.parametrize("charset", ["punycode", "PUNYCODE", "idna"])
def test_a_charset_whose_decoder_is_slow_python_is_read_as_utf8(charset: str) -> None:
    field = ("café " * 60_000).encode()  # 360 KB: punycode's decoder took 16 s on this much
    assert decode_text(field, charset) == field.decode()
