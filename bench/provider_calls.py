"""CPU per provider call, through the SDKs, against bench/fastfakes.py (answers at once), in
one process with no database: what a reply's two provider calls cost before any of Parley's
own work.

    python bench/provider_calls.py [--calls 3000] [--concurrency 64]

Model calls, the same ten-message prompt each way:

* `typed create, httpx2`: `client.chat.completions.create(...)` on the SDK's default transport
  (what Parley did before): the messages are turned into the SDK's typed parameters and the
  answer into pydantic models;
* `typed create, aiohttp`: the same over the SDK's aiohttp transport (`DefaultAioHttpClient`);
* `raw post, aiohttp`: `client.post("/chat/completions", cast_to=httpx2.Response, ...)` over the
  aiohttp transport, the answer read by `assistant.openai.read_answer`: what Parley does.

Twilio sends: `client.messages.create_async(...)` through the SDK's asyncio client (aiohttp),
as Parley sends.

CPU is the process's utime + stime (resource.getrusage) over the timed calls, after a warm-up;
the fake runs in its own process and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.assistant.openai import read_answer  # noqa: E402

ACCOUNT = "AC" + "0" * 32
PROMPT = [
    {"role": "system", "content": "You answer text messages for a bakery. Keep it short."},
    *(
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}: a short text"}
        for i in range(9)
    ),
]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(
    name: str, call: Callable[[], Awaitable[object]], args: argparse.Namespace
) -> float:
    gate = asyncio.Semaphore(args.concurrency)

    async def one() -> None:
        async with gate:
            await call()

    await asyncio.gather(*(one() for _ in range(200)))  # connections open, code warm
    started_cpu, started = cpu_s(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(args.calls)))
    each_ms = (cpu_s() - started_cpu) / args.calls * 1000
    rate = args.calls / (time.perf_counter() - started)
    print(f"{name:<28} {each_ms:6.2f} ms CPU a call  {rate:7.0f} calls/s", flush=True)
    return each_ms


async def model_calls(base_url: str, args: argparse.Namespace) -> None:
    import httpx2
    import openai

    default = openai.AsyncOpenAI(api_key="k", base_url=f"{base_url}/v1", max_retries=0)
    aiohttp = openai.AsyncOpenAI(
        api_key="k",
        base_url=f"{base_url}/v1",
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(),
    )

    async def typed(client: openai.AsyncOpenAI) -> str | None:
        completion = await client.chat.completions.create(model="m", messages=PROMPT)  # type: ignore[arg-type]
        return completion.choices[0].message.content

    async def raw() -> str:
        body = {"model": "m", "messages": PROMPT}
        response = await aiohttp.post("/chat/completions", cast_to=httpx2.Response, body=body)
        return read_answer(response.content).text

    before = await measure("typed create, httpx2", lambda: typed(default), args)
    await measure("typed create, aiohttp", lambda: typed(aiohttp), args)
    after = await measure("raw post, aiohttp", raw, args)
    print(f"raw post over aiohttp / typed create over httpx2: {after / before:.2f}x the CPU")
    await default.close()
    await aiohttp.close()


async def twilio_sends(base_url: str, args: argparse.Namespace) -> None:
    from twilio.http.async_http_client import AsyncTwilioHttpClient
    from twilio.rest import Client

    http = AsyncTwilioHttpClient()
    client = Client(ACCOUNT, "token", http_client=http)
    client.api.base_url = base_url

    async def send() -> str | None:
        message = await client.messages.create_async(
            to="+15550001111", from_="+15550002222", body="We open at nine."
        )
        return message.sid

    await measure("twilio messages.create_async", send, args)
    await http.close()


async def main(args: argparse.Namespace) -> None:
    fake = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.fastfakes", stdout=subprocess.PIPE, cwd=ROOT
    )
    assert fake.stdout is not None
    port = int((await asyncio.wait_for(fake.stdout.readline(), 30)).split()[1])
    drain = asyncio.create_task(fake.stdout.read())  # its event lines, unread
    try:
        await model_calls(f"http://127.0.0.1:{port}", args)
        await twilio_sends(f"http://127.0.0.1:{port}", args)
    finally:
        fake.terminate()
        await fake.wait()
        await drain


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(parser.parse_args()))
    else:
        uvloop.run(main(parser.parse_args()))
