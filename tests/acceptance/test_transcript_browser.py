"""The transcript page in a real browser: headless Chromium (Debian's `chromium` package) opens
a sample conversation served by a real `parley serve` process, on a phone-sized window.

Checks what a person sees: the rendered text of both sides, the markup a texter sent shown as
text, no script, the inline style sheet accepted by the Content-Security-Policy (Chromium logs
any violation, and the page's colours show in the screenshot). `PARLEY_UPDATE_SCREENSHOT=1`
also writes the screenshot to docs/transcript.png for the README.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from service.models import AssistantCall, Conversation, Message
from tests.processes import parley_env, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = (412, 915)  # a common phone viewport in CSS pixels
DOCS_SCREENSHOT = Path(__file__).parents[2] / "docs" / "transcript.png"
TOKEN = "s4mPle-Tr4nscript-t0ken-for-the-browser-test0"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian: apt-get install chromium; .ci/run "
    "installs it where it can)",
)


async def seed_sample(engine: AsyncEngine) -> None:
    """A conversation with every state a reader should be able to tell apart."""
    start = dt.datetime(2026, 11, 20, 18, 2, tzinfo=dt.UTC)

    def at(minutes: float) -> dt.datetime:
        return start + dt.timedelta(minutes=minutes)

    async with engine.begin() as connection:
        conversation_id = (
            await connection.execute(
                insert(Conversation)
                .values(
                    channel="sms",
                    remote_address="+15550001111",
                    local_address="+15559990000",
                    summary="Hi! Do you have a table for 4 tonight around 7pm?",
                    conversation_url=TOKEN,
                    paused=True,
                    created_at=at(0),
                    updated_at=at(31),
                )
                .returning(Conversation.id)
            )
        ).scalar_one()
        rows = [
            ("user", None, "Hi! Do you have a table for 4 tonight around 7pm?", "answered", None),
            (
                "assistant",
                "model",
                "We do! I can hold a table for 4 at 7:00 pm. Shall I book it under your name?",
                "delivered",
                None,
            ),
            (
                "user",
                None,
                "Yes please, it's Jordan. <script>alert('hi')</script> Can we bring our dog?",
                "answered",
                None,
            ),
            (
                "assistant",
                "model",
                "Booked for Jordan at 7:00 pm. Dogs are welcome on the terrace.",
                "failed",
                "Twilio 30003: Unreachable destination handset",
            ),
            ("user", None, "Hello?? Did that go through?", "rate_limited", None),
            (
                "assistant",
                "operator",
                "Hi Jordan, Sam here from the restaurant: you're booked for 7:00 pm, "
                "terrace table, dog welcome. See you tonight!",
                "sent",
                None,
            ),
            ("user", None, "Perfect, thank you Sam!", "not_answered", None),
        ]
        for n, (sender, author, body, status, error) in enumerate(rows):
            await connection.execute(
                insert(Message).values(
                    conversation_id=conversation_id,
                    channel="sms",
                    sender=sender,
                    author=author,
                    body=body,
                    status=status,
                    error=error,
                    provider_message_id=f"SM{n:032x}" if sender == "assistant" else None,
                    created_at=at(n * 5 + (0.2 if sender == "assistant" else 0)),
                    updated_at=at(n * 5 + 1),
                )
            )
        await connection.execute(
            insert(AssistantCall).values(
                conversation_id=conversation_id,
                model="gpt-4o-mini",
                status="ok",
                processing_time=840,
                prompt_tokens=61,
                completion_tokens=24,
                total_tokens=85,
            )
        )


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--force-prefers-color-scheme=light",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )


def png_pixels(path: Path) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Width, height and RGB pixels of an 8-bit RGB(A) PNG, as Chromium writes them."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat, header = 8, b"", b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        chunk = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            idat += chunk
        position += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and color in (2, 6), (depth, color)
    channels = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    previous = bytearray(stride)
    pixels: list[tuple[int, int, int]] = []
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            upper_left = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                estimate = left + up - upper_left
                pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - upper_left)
                nearest = left if pa <= pb and pa <= pc else (up if pb <= pc else upper_left)
                line[i] = (line[i] + nearest) & 0xFF
        pixels.extend((line[x], line[x + 1], line[x + 2]) for x in range(0, stride, channels))
        previous = line
    return width, height, pixels


async def test_a_person_on_a_phone_sees_the_whole_conversation(
    engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    await seed_sample(engine)
    env = parley_env(DATABASE_URL=database_url, PARLEY_DEV="1", AUTO_MIGRATE="false")
    with serving(env, tmp_path) as (port, _process):
        url = f"http://127.0.0.1:{port}/c/{TOKEN}"
        async with httpx.AsyncClient() as http:
            assert (await http.get(url)).status_code == 200
        dom = chromium("--dump-dom", url, profile=tmp_path / "profile-dom")
        shot = tmp_path / "transcript.png"
        taken = chromium(f"--screenshot={shot}", url, profile=tmp_path / "profile-shot")

    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    for seen in (
        "SMS conversation with +1555•••1111",
        "Hi! Do you have a table for 4 tonight around 7pm?",
        "We do! I can hold a table for 4",
        "&lt;script&gt;alert('hi')&lt;/script&gt;",  # the texter's markup, shown as text
        ">delivered<",
        ">failed<",
        "Twilio 30003: Unreachable destination handset",
        "rate limited: not answered",
        ">Operator<",
        "Paused: a person is handling this conversation",
        "2026-11-20 18:02 UTC",
    ):
        assert seen in page, seen
    assert "+15550001111" not in page
    assert "<script" not in page  # no script element made it into the document
    for run in (dom, taken):
        assert "Content Security Policy" not in run.stderr, run.stderr[-2000:]

    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    width, height, pixels = png_pixels(shot)
    assert (width, height) == WINDOW
    colours = set(pixels)
    assert len(colours) > 50  # text, bubbles, badges: antialiased, many colours
    page_background, our_bubble = (0xF4, 0xF5, 0xF7), (0xDC, 0xEB, 0xFF)
    assert page_background in colours and our_bubble in colours  # the style sheet applied
    if os.environ.get("PARLEY_UPDATE_SCREENSHOT"):
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(shot, DOCS_SCREENSHOT)
