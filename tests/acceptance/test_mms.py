"""MMS as a person, the model and an operator see it (SPEC §10): recorded, signed MMS webhooks
through the real app; the worker fetches each item from the fake Twilio (Basic auth, its CDN
redirect) and the real openai SDK carries the images to the fake model as `image_url` parts.
Both databases."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.models import AssistantCall, Conversation, Message
from tests.acceptance.test_cli_admin import parley
from tests.conftest import TWILIO_SID, TWILIO_TOKEN, SettingsFactory, running_app
from tests.fakes import FakeMedia, FakeProviders
from tests.helpers import (
    conversations,
    eventually,
    form_of,
    jobs,
    messages,
    post_twilio,
    replay,
    settled,
    twilio_form,
)
from tests.processes import parley_env, serving

ADMIN_TOKEN = "admin-secret"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FAST: dict[str, Any] = {"worker_poll_s": 0.05, "reply_retry_base_s": 0.05}
TWO_IMAGES = "twilio/sms_mms_two_images.json"
JPEG = b"\xff\xd8\xff\xe0" + b"J" * 1200  # 1,204 bytes: "1 KB"
PNG = b"\x89PNG\r\n\x1a\n" + b"P" * 3000  # 3,008 bytes: "3 KB"
AMR = b"#!AMR\n" + b"A" * (12 * 1024 - 6)  # "12 KB"
BIG = 50 * 1024 * 1024


def settings(make_settings: SettingsFactory, **overrides: Any) -> Any:
    return make_settings(**{**FAST, "admin_token": ADMIN_TOKEN, **overrides})


def data_url(kind: str, content: bytes) -> str:
    return f"data:{kind};base64,{base64.b64encode(content).decode()}"


def image_part(kind: str, content: bytes) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(kind, content)}}


def sid_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


async def mms(
    client: httpx.AsyncClient,
    body: str,
    media: list[tuple[str, str]],
    name: str = TWO_IMAGES,
    sender: str | None = None,
) -> None:
    """The person (or `sender`) sends an MMS (a fresh sid) with these (url, type) items."""
    fields = {"Body": body, "NumMedia": str(len(media)), **({"From": sender} if sender else {})}
    for index in range(10):
        fields |= {f"MediaUrl{index}": None, f"MediaContentType{index}": None}
    for index, (url, kind) in enumerate(media):
        fields |= {f"MediaUrl{index}": url, f"MediaContentType{index}": kind}
    response = await post_twilio(client, twilio_form(name, **fields))
    assert response.status_code == 200, response.text


async def done(engine: AsyncEngine) -> None:
    await eventually(lambda: settled(engine), timeout=15)


def last_user_content(request: dict[str, Any]) -> Any:
    return request["messages"][-1]["content"]


# ------------------------------------------------------------------ images to the model


async def test_two_images_reach_the_model_after_the_text_and_later_turns_carry_notes(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    recorded = form_of(TWO_IMAGES)
    # The recorded MMS, its Media URLs on this deployment's Twilio host (the fake).
    jpeg_url, png_url = (
        recorded[f"MediaUrl{i}"].replace("https://api.twilio.com", providers.base_url)
        for i in range(2)
    )
    providers.serve_media(sid_of(jpeg_url), FakeMedia(JPEG, "image/jpeg"))
    providers.serve_media(sid_of(png_url), FakeMedia(PNG, "image/png"))
    amr_url = providers.serve_media("ME" + "3" * 32, FakeMedia(AMR, "audio/amr"))
    media = [(jpeg_url, "image/jpeg"), (png_url, "image/png"), (amr_url, "audio/amr")]
    async with running_app(settings(make_settings)) as client:
        await mms(client, recorded["Body"], media)
        await done(engine)
        await mms(client, "And which one is cheaper?", [])
        await done(engine)
        [conversation] = await conversations(engine)
        detail = (await client.get(f"/api/conversations/{conversation.id}", headers=AUTH)).json()
        page = (await client.get(f"/c/{conversation.conversation_url}")).text

    first, second = providers.openai_requests
    assert last_user_content(first) == [
        {"type": "text", "text": f"{recorded['Body']}\n[attachment: audio/amr, 12 KB]"},
        image_part("image/jpeg", JPEG),
        image_part("image/png", PNG),
    ]
    # The next turn: the photos are history now, as notes with the size learned at fetch time.
    assert providers.openai_image_parts[1] == [[] for _ in second["messages"]]
    assert second["messages"][1] == {
        "role": "user",
        "content": f"{recorded['Body']}\n[attachment: image/jpeg, 1 KB]\n"
        "[attachment: image/png, 3 KB]\n[attachment: audio/amr, 12 KB]",
    }
    assert len(providers.twilio_sent) == 2
    # Basic auth on each Media URL, then Twilio's redirect to its CDN path, per item.
    hits = providers.media_requests
    assert sorted(h["outcome"] for h in hits) == ["ok"] * 3 + ["redirect"] * 3
    assert {h["auth"] for h in hits if "/Media/" in h["path"]} == {(TWILIO_SID, TWILIO_TOKEN)}
    # Stored: URL, type, size, state; never the bytes.
    [photo, _] = await messages(engine, Message.sender == "user")
    assert [(m["content_type"], m["size"], m["state"]) for m in photo.media] == [
        ("image/jpeg", len(JPEG), "fetched"),
        ("image/png", len(PNG), "fetched"),
        ("audio/amr", len(AMR), "fetched"),
    ]
    await assert_no_media_bytes_stored(engine, [JPEG, PNG, AMR])
    # The operator and the transcript see each item's type and size.
    api_media = detail["messages"][0]["media"]
    assert [(m["content_type"], m["size"], m["description"]) for m in api_media] == [
        ("image/jpeg", len(JPEG), "image/jpeg, 1 KB"),
        ("image/png", len(PNG), "image/png, 3 KB"),
        ("audio/amr", len(AMR), "audio/amr, 12 KB"),
    ]
    assert detail["messages"][0]["media"][0]["url"] == jpeg_url
    for described in ("image/jpeg, 1 KB", "image/png, 3 KB", "audio/amr, 12 KB"):
        assert described in page


async def assert_no_media_bytes_stored(engine: AsyncEngine, contents: list[bytes]) -> None:
    async with engine.connect() as connection:
        stored = [
            json.dumps([list(map(str, row)) for row in await connection.execute(select(table))])
            for table in (Message, Conversation, AssistantCall)
        ]
    text = "".join(stored)
    assert "data:image" not in text and "base64" not in text
    for content in contents:
        assert base64.b64encode(content).decode()[:40] not in text


async def test_a_media_only_mms_is_answered_with_the_picture_alone(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    url = providers.serve_media("ME" + "1" * 32, FakeMedia(JPEG, "image/jpeg"))
    async with running_app(settings(make_settings)) as client:
        await mms(client, "", [(url, "image/jpeg")], name="twilio/sms_mms_media_only.json")
        await done(engine)

    [request] = providers.openai_requests
    assert last_user_content(request) == [image_part("image/jpeg", JPEG)]
    [sent] = providers.twilio_sent
    assert sent["To"] == "+15550001111" and sent["Body"]
    [photo] = await messages(engine, Message.sender == "user")
    assert (photo.body, photo.status) == ("", "answered")
    [conversation] = await conversations(engine)  # listed by what was sent, not as blank
    assert conversation.summary == "[attachment: image/jpeg]"


async def test_recorded_mms_with_media_off_this_twilio_host_is_described_not_fetched(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """The recordings point at api.twilio.com; this deployment's Twilio is the fake."""
    async with running_app(settings(make_settings)) as client:
        assert (await replay(client, TWO_IMAGES)).status_code == 200
        await done(engine)  # else both are answered together, in one model call
        assert (await replay(client, "twilio/sms_mms_media_only.json")).status_code == 200
        await done(engine)

    assert providers.media_requests == []
    first, second = (last_user_content(r) for r in providers.openai_requests)
    note = "[attachment: {} at api.twilio.com, not fetched]"
    assert first == (
        f"{form_of(TWO_IMAGES)['Body']}\n{note.format('image/jpeg')}\n{note.format('image/png')}"
    )
    assert second == note.format("image/jpeg")
    stored = [m.media for m in await messages(engine, Message.sender == "user")]
    assert [[(i["content_type"], i["state"]) for i in media] for media in stored] == [
        [("image/jpeg", "not_fetched"), ("image/png", "not_fetched")],
        [("image/jpeg", "not_fetched")],
    ]
    assert len(providers.twilio_sent) == 2


async def test_without_twilio_credentials_a_photo_is_described_at_once_not_fetched(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    """The laptop mode: `parley serve --dev` with no account has no Twilio to fetch from."""
    photo = providers.serve_media("ME" + "4" * 32, FakeMedia(JPEG, "image/jpeg"))
    laptop = settings(
        make_settings, twilio_account_sid=None, twilio_auth_token=None, parley_dev=True
    )
    async with running_app(laptop) as client:
        await mms(client, "what is this?", [(photo, "image/jpeg")])
        await done(engine)

    assert providers.media_requests == []
    [request] = providers.openai_requests
    assert last_user_content(request) == (
        "what is this?\n[attachment: image/jpeg at 127.0.0.1, not fetched]"
    )
    [job] = await jobs(engine)
    assert (job.status, job.attempts) == ("done", 1)


async def test_without_vision_images_are_notes_and_are_not_downloaded(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    url = providers.serve_media("ME" + "1" * 32, FakeMedia(JPEG, "image/jpeg"))
    async with running_app(settings(make_settings, assistant_vision=False)) as client:
        await mms(client, "Look", [(url, "image/jpeg")])
        await done(engine)

    [request] = providers.openai_requests
    assert last_user_content(request) == "Look\n[attachment: image/jpeg, 1 KB]"


async def test_a_whatsapp_photo_is_fetched_and_shown_to_the_model_like_an_mms(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    recorded = form_of("twilio/whatsapp_image.json")
    url = recorded["MediaUrl0"].replace("https://api.twilio.com", providers.base_url)
    providers.serve_media(sid_of(url), FakeMedia(JPEG, "image/jpeg"))
    form = twilio_form("twilio/whatsapp_image.json", MediaUrl0=url)
    async with running_app(settings(make_settings)) as client:
        response = await post_twilio(client, form, path="/webhooks/twilio/whatsapp")
        assert response.status_code == 200, response.text
        await done(engine)

    [request] = providers.openai_requests
    assert last_user_content(request) == [image_part("image/jpeg", JPEG)]
    [sent] = providers.twilio_sent
    assert sent["To"] == "whatsapp:+15550001111"


# ------------------------------------------------------------------ what cannot be fetched


async def test_a_missing_item_is_noted_unavailable_and_a_foreign_url_is_never_fetched(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    missing = providers.media_url("ME" + "9" * 32)  # Twilio answers 404
    served = providers.serve_media("ME" + "4" * 32, FakeMedia(JPEG, "image/jpeg"))
    foreign = served.replace("127.0.0.1", "localhost")  # the same server under another host
    async with running_app(settings(make_settings)) as client:
        await mms(client, "Look", [(missing, "image/jpeg"), (foreign, "image/png")])
        await done(engine)

    assert [h["outcome"] for h in providers.media_requests] == ["404"]
    [request] = providers.openai_requests
    assert last_user_content(request) == (
        "Look\n[attachment: image/jpeg, unavailable]\n"
        "[attachment: image/png at localhost, not fetched]"
    )
    [photo] = await messages(engine, Message.sender == "user")
    assert [m["state"] for m in photo.media] == ["unavailable", "not_fetched"]
    assert photo.status == "answered" and len(providers.twilio_sent) == 1


async def test_a_twilio_500_on_media_is_retried_like_any_provider_failure(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    url = providers.serve_media("ME" + "1" * 32, FakeMedia(JPEG, "image/jpeg", failures=[500]))
    async with running_app(settings(make_settings)) as client:
        await mms(client, "Look", [(url, "image/jpeg")])
        await done(engine)

    assert [h["outcome"] for h in providers.media_requests] == ["500", "redirect", "ok"]
    [request] = providers.openai_requests  # the model was asked once, with the picture
    assert last_user_content(request)[1] == image_part("image/jpeg", JPEG)
    [job] = await jobs(engine)
    assert (job.status, job.attempts) == ("done", 2)
    assert len(providers.twilio_sent) == 1


async def test_a_media_fetch_that_times_out_is_retried(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    slow = FakeMedia(JPEG, "image/jpeg", slow_s=2.0, slow_times=1)
    url = providers.serve_media("ME" + "1" * 32, slow)
    async with running_app(settings(make_settings, media_timeout_s=0.3)) as client:
        await mms(client, "Look", [(url, "image/jpeg")])
        await done(engine)

    [request] = providers.openai_requests
    assert last_user_content(request)[1] == image_part("image/jpeg", JPEG)
    [job] = await jobs(engine)
    assert (job.status, job.attempts) == ("done", 2)


async def test_an_item_over_media_max_bytes_is_not_downloaded_past_the_limit(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    unsized = providers.serve_media(
        "ME" + "5" * 32, FakeMedia(content_type="image/jpeg", stream_bytes=BIG)
    )
    sized = providers.serve_media(
        "ME" + "6" * 32,
        FakeMedia(content_type="video/mp4", stream_bytes=BIG, declare_length=True),
    )
    limit = 64 * 1024
    async with running_app(settings(make_settings, media_max_bytes=limit)) as client:
        await mms(client, "Look", [(unsized, "image/jpeg"), (sized, "video/mp4")])
        await done(engine)

    [request] = providers.openai_requests
    assert last_user_content(request) == (
        "Look\n[attachment: image/jpeg, too large to open]\n"
        "[attachment: video/mp4, 50.0 MB, too large to open]"
    )
    # Reading stopped at the limit: what the fake wrote is the limit plus socket buffers.
    assert providers.media_streamed(sid_of(unsized)) < BIG // 4
    assert providers.media_streamed(sid_of(sized)) < BIG // 4
    [photo] = await messages(engine, Message.sender == "user")
    assert [(m["state"], m["size"]) for m in photo.media] == [
        ("too_large", None),
        ("too_large", BIG),
    ]


async def test_pictures_wait_for_the_process_memory_budget_and_every_one_reaches_the_model(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    # Room for one photo's worth (MEDIA_MEMORY_BYTES = MEDIA_MAX_BYTES): while the first
    # person's picture is in a model call, the second person's is not even fetched.
    providers.openai_delay = 0.8
    first = providers.serve_media("ME" + "a" * 32, FakeMedia(JPEG, "image/jpeg"))
    second = providers.serve_media("ME" + "b" * 32, FakeMedia(PNG, "image/png"))
    limits = {"media_max_bytes": 100_000, "media_memory_bytes": 100_000}
    async with running_app(settings(make_settings, **limits)) as client:
        await mms(client, "Mine", [(first, "image/jpeg")])
        await eventually(lambda: len(providers.openai_requests) == 1)
        await mms(client, "And mine", [(second, "image/png")], sender="+15557770002")
        await asyncio.sleep(0.4)  # unbounded, its fetch and its model call start at once
        assert [h["path"] for h in providers.media_requests if sid_of(second) in h["path"]] == []
        assert len(providers.openai_requests) == 1
        await done(engine)

    pictures = {str(last_user_content(r)[0]["text"]): r for r in providers.openai_requests}
    assert last_user_content(pictures["Mine"])[1] == image_part("image/jpeg", JPEG)
    assert last_user_content(pictures["And mine"])[1] == image_part("image/png", PNG)
    assert len(providers.twilio_sent) == 2


# ------------------------------------------------------------------ the command line


def test_parley_sms_with_media_sends_an_mms_to_a_running_server(
    database_url: str, tmp_path: Path, providers: FakeProviders
) -> None:
    # The CLI types each item by its name, as a phone would.
    url = providers.serve_media("ME" + "7" * 32 + ".png", FakeMedia(PNG, "image/png"))
    twilio = {
        "TWILIO_ACCOUNT_SID": TWILIO_SID,
        "TWILIO_AUTH_TOKEN": TWILIO_TOKEN,
        "TWILIO_API_BASE_URL": providers.base_url,
    }
    env = parley_env(DATABASE_URL=database_url, **twilio)
    with serving(env, tmp_path, ("--dev",)) as (port, _):
        result = parley(
            ["sms", "What is this?", "--media", url, "--url", f"http://127.0.0.1:{port}"],
            database_url,
            tmp_path,
            **twilio,
        )

    assert result.returncode == 0, result.stderr
    # The offline assistant says what it was given: the text and one image part.
    assert 'You said: "What is this? [1 image(s)]"' in result.stdout, result.stdout
    assert [h["outcome"] for h in providers.media_requests] == ["redirect", "ok"]
    [sent] = providers.twilio_sent
    assert sent["To"] == "+15550001111"
