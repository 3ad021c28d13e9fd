"""The MMS rules as pure functions: the note text, image parts and their order, the token rule,
Twilio's media host and redirect policy, the webhook's media list and the CLI's MMS form."""

from __future__ import annotations

import base64

import pytest

from service.channels.twilio.media import Hop, follow, on_media_host, redirect_hosts
from service.channels.twilio.webhook import media_of
from service.conversation import (
    StoredTurn,
    build_prompt,
    content_of,
    join_parts,
    turn_of,
    turn_tokens,
)
from service.media import (
    IMAGE_TOKENS,
    arriving_turn,
    data_url,
    format_size,
    history_text,
    note,
    sniff_image,
)
from service.testing import inbound_form, with_media
from service.types import MediaItem, MediaState, Sender, Turn, media_from_json

API = "https://api.twilio.com"
MEDIA = f"{API}/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1"
JPEG = b"\xff\xd8\xff\xe0" + b"j" * 100
PNG = b"\x89PNG\r\n\x1a\n" + b"p" * 100
CDN = redirect_hosts("*.twiliocdn.com,s3-external-1.amazonaws.com")


def item(
    kind: str, state: MediaState = MediaState.FETCHED, size: int | None = 12 * 1024
) -> MediaItem:
    return MediaItem(MEDIA, kind, size, state)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 bytes"), (1023, "1023 bytes"), (1024, "1 KB"), (12 * 1024 + 300, "12 KB"),
     (1024 * 1024, "1.0 MB"), (5_242_880, "5.0 MB")],
)  # fmt: skip
def test_sizes_read_as_a_phone_shows_them(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize(
    ("media", "text"),
    [
        (item("audio/amr"), "[attachment: audio/amr, 12 KB]"),
        (item("Image/JPEG; x=y", MediaState.DECLARED, None), "[attachment: image/jpeg]"),
        (item("image/jpeg", MediaState.UNAVAILABLE, None), "[attachment: image/jpeg, unavailable]"),
        (item("video/mp4", MediaState.TOO_LARGE, 9 * 1024 * 1024),
         "[attachment: video/mp4, 9.0 MB, too large to open]"),
        (item("video/3gpp", MediaState.TOO_LARGE, None),
         "[attachment: video/3gpp, too large to open]"),
        (MediaItem("https://evil.example/x", "image/png", state=MediaState.NOT_FETCHED),
         "[attachment: image/png at evil.example, not fetched]"),
    ],
)  # fmt: skip
def test_each_attachment_the_model_cannot_see_is_a_short_note(media: MediaItem, text: str) -> None:
    assert note(media) == text


def test_images_follow_the_text_in_the_order_sent_and_other_types_are_notes() -> None:
    turn, _ = arriving_turn(
        "Which one?",
        [(item("image/jpeg"), JPEG), (item("text/vcard"), None), (item("image/png"), PNG)],
    )
    assert turn.body == "Which one?\n[attachment: text/vcard, 12 KB]"
    assert turn.images == (data_url(JPEG), data_url(PNG))
    assert content_of(turn) == [
        {"type": "text", "text": "Which one?\n[attachment: text/vcard, 12 KB]"},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b64(JPEG)}"}},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(PNG)}"}},
    ]


def test_images_past_the_prompts_image_budget_are_notes() -> None:
    pictures = [(item("image/jpeg"), JPEG), (item("image/png"), PNG), (item("image/jpeg"), JPEG)]
    turn, left = arriving_turn("", pictures, image_budget=len(JPEG) + len(PNG) // 2)
    assert turn.images == (data_url(JPEG),)  # the PNG does not fit; the second JPEG would not
    assert turn.body.count("[attachment: ") == 2
    assert left == len(PNG) // 2


def b64(content: bytes) -> str:
    return base64.b64encode(content).decode()


def test_a_picture_alone_has_no_empty_text_part() -> None:
    turn, _ = arriving_turn("", [(item("image/jpeg"), JPEG)])
    assert content_of(turn) == [{"type": "image_url", "image_url": {"url": data_url(JPEG)}}]


def test_bytes_that_are_not_the_image_they_claim_become_a_note() -> None:
    turn, _ = arriving_turn("", [(item("image/jpeg"), b"<html>not a picture</html>")])
    assert (turn.body, turn.images) == ("[attachment: image/jpeg, 12 KB]", ())
    assert sniff_image(PNG) == "image/png" and data_url(PNG).startswith("data:image/png;base64,")
    assert sniff_image(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff_image(b"GIF89a...") == "image/gif"


def test_history_shows_attachments_as_notes_never_as_images() -> None:
    assert history_text("Menu", [item("image/jpeg", size=1024)]) == (
        "Menu\n[attachment: image/jpeg, 1 KB]"
    )
    assert history_text("", []) == ""


def test_each_image_costs_a_photo_s_tokens_against_the_history_budget() -> None:
    photo = Turn(Sender.USER, "hi", (data_url(JPEG) or "",) * 2)
    assert IMAGE_TOKENS == 765
    assert turn_tokens(photo) == turn_tokens(Turn(Sender.USER, "hi")) + 2 * 765
    old = [Turn(Sender.USER, "x" * 400)]  # about 104 tokens
    kept = build_prompt(None, "", old, [photo], max_messages=10, max_tokens=1700)
    dropped = build_prompt(None, "", old, [photo], max_messages=10, max_tokens=1600)
    assert len(kept) == 3 and len(dropped) == 2


def test_only_the_api_s_own_origin_is_twilio_s_media_host() -> None:
    assert on_media_host(MEDIA, API)
    assert on_media_host("https://API.twilio.com:443/x", API)
    assert not on_media_host("http://api.twilio.com/x", API)  # another scheme
    assert not on_media_host("https://api.twilio.com.evil.example/x", API)
    assert not on_media_host("https://evil.example/x", API)
    assert not on_media_host("http://127.0.0.1:81/x", "http://127.0.0.1:80")
    assert not on_media_host("file:///etc/passwd", API)
    assert not on_media_host("https://[::1/x", API)  # unparsable: described, not a crash
    assert follow(MEDIA, "https://[::1/x", API, CDN) is None


def test_redirects_keep_credentials_on_the_api_host_and_drop_them_on_its_cdn() -> None:
    assert follow(MEDIA, "/cdn/ME1", API, CDN) == Hop(f"{API}/cdn/ME1", credentials=True)
    cdn = "https://media.twiliocdn.com/AC1/abc"
    assert follow(MEDIA, cdn, API, CDN) == Hop(cdn, credentials=False)
    s3 = "https://s3-external-1.amazonaws.com/media.twiliocdn.com/AC1/abc"
    assert follow(MEDIA, s3, API, CDN) == Hop(s3, credentials=False)
    assert follow(MEDIA, "http://media.twiliocdn.com/x", API, CDN) is None  # no downgrade
    assert follow(MEDIA, "https://twiliocdn.com.evil.example/x", API, CDN) is None
    assert follow(MEDIA, "http://169.254.169.254/latest/meta-data", API, CDN) is None


def test_the_webhook_reads_num_media_items_in_order_and_fetches_nothing() -> None:
    form = {
        "NumMedia": "3",
        "MediaUrl0": MEDIA,
        "MediaContentType0": "image/JPEG",
        "MediaUrl1": " ",
        "MediaUrl2": MEDIA + "2",
        "MediaUrl3": "beyond NumMedia",
    }
    assert media_of(form) == (
        MediaItem(MEDIA, "image/jpeg"),
        MediaItem(MEDIA + "2", "application/octet-stream"),
    )
    assert media_of({"NumMedia": "eleven", "MediaUrl0": MEDIA}) == ()
    assert len(media_of({"NumMedia": "99", **{f"MediaUrl{i}": MEDIA for i in range(12)}})) == 10


def test_stored_media_survive_odd_rows() -> None:
    stored = [item("image/png").to_json(), {"url": 3}, "x", {"url": MEDIA, "state": "odd"}]
    assert media_from_json(stored) == (
        item("image/png"),
        MediaItem(MEDIA, "application/octet-stream"),
    )
    assert media_from_json(None) == ()


def test_the_cli_s_mms_form_is_shaped_as_twilio_s() -> None:
    form = inbound_form("", "+15550001111", "+15559990000", "SM" + "a" * 32, "AC1")
    mms = with_media(form, ["https://example.com/a.png", "https://example.com/clip"])
    assert mms["NumMedia"] == "2" and mms["MessageSid"] == "MM" + "a" * 32
    assert mms["SmsSid"] == mms["SmsMessageSid"] == mms["MessageSid"]
    assert (mms["MediaUrl0"], mms["MediaContentType0"]) == (
        "https://example.com/a.png",
        "image/png",
    )
    assert mms["MediaContentType1"] == "application/octet-stream"
    assert with_media(form, []) == form


def test_a_stored_message_with_media_is_history_with_notes_in_either_memory() -> None:
    row = StoredTurn(Sender.USER, "Menu", None, 7, (item("image/jpeg", size=2048),))
    assert turn_of([row]) == Turn(Sender.USER, "Menu\n[attachment: image/jpeg, 2 KB]")
    assert join_parts([row]) == [turn_of([row])]
