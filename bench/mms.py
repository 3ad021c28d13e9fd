"""What a 3-image MMS costs the worker: fetch time, CPU, and the bytes sent to the model.

    python bench/mms.py [--runs 20] [--sizes 300000,1600000] [--end-to-end 10]

Part 1 runs the worker's own steps for one MMS with three JPEG-shaped images of each size,
against tests/fakes.py's fake Twilio on loopback (Basic auth, the redirect to its CDN path):
the fetch (`TwilioMedia.fetch`, the three items at once), the prompt with its `data:` URLs
(`media.arriving_turn`, `conversation.build_prompt`) and the JSON body the openai SDK sends.
Wall time, the worker thread's CPU (`time.thread_time`, so the fake's thread is not counted)
and the body's size are reported as medians, with the plain-text prompt as the baseline.

Part 2 (`--end-to-end N`) runs the real app in-process on a fresh SQLite file with the fakes
(the real twilio and openai SDKs), texts it N plain SMS and N 3-image MMS one at a time, and
reports the median time from the webhook's 200 to the reply accepted by the fake Twilio.
Loopback has no network latency: a real deployment adds Twilio's CDN round trips.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from service.channels.twilio.media import TwilioMedia
from service.conversation import build_prompt
from service.db import create_engine
from service.media import arriving_turn
from service.migrate import upgrade
from service.settings import Settings
from service.testing import inbound_form, sign, with_media
from service.types import MediaItem, Sender, Turn
from service.web.app import create_app
from tests.fakes import FakeMedia, FakeProviders

SID = "AC32d0d85518aa25edef571b53f079c2be"
TOKEN = "bench-token"
PUBLIC = "https://parley.example.com"
STYLE = "This conversation is over SMS: answer briefly, in plain text, no Markdown."
TEXT = "Which of these three parts fits my bike?"


def jpeg(size: int, seed: int) -> bytes:
    """JPEG-shaped bytes (magic number, then incompressible filler) of exactly `size`."""
    head = b"\xff\xd8\xff\xe0"
    return head + secrets.token_bytes(size - len(head) - 1) + bytes([seed])


def settings(fake: FakeProviders, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "twilio_account_sid": SID,
        "twilio_auth_token": TOKEN,
        "twilio_api_base_url": fake.base_url,
        "_env_file": None,
        **overrides,
    }
    return Settings(**values)


def body_bytes(turn: Turn) -> int:
    prompt = build_prompt(None, STYLE, [], [turn], max_messages=20, max_tokens=4000)
    return len(json.dumps({"model": "gpt-4o-mini", "messages": prompt}).encode())


async def worker_steps(fake: FakeProviders, size: int, runs: int) -> dict[str, float]:
    media = TwilioMedia(settings(fake))
    items = [
        MediaItem(
            fake.serve_media(f"ME{size:016x}{i:016x}", FakeMedia(jpeg(size, i))), "image/jpeg"
        )
        for i in range(3)
    ]
    walls, fetches, cpus, sizes = [], [], [], []
    try:
        for _ in range(runs):
            started, cpu = time.perf_counter(), time.thread_time()
            fetched = await media.fetch(items, lambda item: True)
            fetch_s = time.perf_counter() - started
            turn = arriving_turn(TEXT, [(a.item, a.content) for a in fetched])
            sizes.append(body_bytes(turn))
            walls.append(time.perf_counter() - started)
            fetches.append(fetch_s)
            cpus.append(time.thread_time() - cpu)
    finally:
        await media.close()
    return {
        "fetch_ms": statistics.median(fetches) * 1000,
        "total_ms": statistics.median(walls) * 1000,
        "cpu_ms": statistics.median(cpus) * 1000,
        "body_bytes": statistics.median(sizes),
    }


async def end_to_end(fake: FakeProviders, runs: int, size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite+aiosqlite:///{folder}/bench.db"
        engine = create_engine(url)
        await upgrade(engine)
        await engine.dispose()
        app = create_app(
            settings(
                fake,
                database_url=url,
                public_base_url=PUBLIC,
                auto_migrate=False,
                openai_api_key="bench",
                openai_base_url=fake.base_url + "/v1",
                worker_poll_s=0.02,
            )
        )
        urls = [fake.serve_media(f"MF{i:032x}", FakeMedia(jpeg(size, i))) for i in range(3)]
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=PUBLIC) as client:
                sms = [await one_reply(client, fake, n, []) for n in range(runs)]
                mms = [await one_reply(client, fake, runs + n, urls) for n in range(runs)]
    return {"sms_ms": statistics.median(sms) * 1000, "mms_ms": statistics.median(mms) * 1000}


async def one_reply(
    client: httpx.AsyncClient, fake: FakeProviders, n: int, media: list[str]
) -> float:
    """Text once (a new sender each time, so no history); seconds from the 200 to the send."""
    sender = f"+1555{n:07d}"
    form = with_media(
        inbound_form(TEXT, sender, "+15559990000", "SM" + secrets.token_hex(16), SID), media
    )
    path = "/webhooks/twilio/sms"
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": sign(TOKEN, PUBLIC + path, form),
    }
    before = len(fake.twilio_sent)
    response = await client.post(path, content=urlencode(form), headers=headers)
    assert response.status_code == 200, response.text
    started = time.perf_counter()
    await fake.wait_for_async(lambda: len(fake.twilio_sent) > before, timeout=30, interval=0.002)
    return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--sizes", default="300000,1600000", help="bytes per image")
    parser.add_argument("--end-to-end", type=int, default=10, help="replies per kind; 0: skip")
    args = parser.parse_args()
    async with FakeProviders() as fake:
        text_only = body_bytes(Turn(Sender.USER, TEXT))
        print(f"plain-text prompt body: {text_only} bytes")
        print("3 images x size | fetch ms | fetch+prompt ms | worker CPU ms | body to model")
        for size in (int(s) for s in args.sizes.split(",")):
            row = await worker_steps(fake, size, args.runs)
            print(
                f"3 x {size / 1000:,.0f} kB | {row['fetch_ms']:.1f} | {row['total_ms']:.1f} | "
                f"{row['cpu_ms']:.1f} | {row['body_bytes'] / 1e6:.2f} MB"
            )
        if args.end_to_end:
            sizes = [int(s) for s in args.sizes.split(",")]
            e2e = await end_to_end(fake, args.end_to_end, sizes[0])
            print(
                f"end to end, webhook 200 -> reply sent (median of {args.end_to_end}): "
                f"SMS {e2e['sms_ms']:.0f} ms, 3-image MMS (3 x {sizes[0] / 1000:,.0f} kB) "
                f"{e2e['mms_ms']:.0f} ms"
            )


if __name__ == "__main__":
    asyncio.run(main())
