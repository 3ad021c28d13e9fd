"""What SPEC §12's debounce costs and buys, on a real `parley serve` (SQLite, the fake providers of
tests/fakes.py on loopback, the fake model answering after `--model-latency` seconds):

    python bench/debounce.py [--singles 10] [--bursts 5] [--model-latency 1.0]
                             [--debounce 0,1.5] [--root /tmp/parley-main]

For each REPLY_DEBOUNCE_S (REPLY_DEBOUNCE_MAX_S and WORKER_POLL_S at their defaults):

* latency: `--singles` texts, each from a new sender, one at a time: webhook posted -> reply
  accepted by the fake Twilio, p50 and max;
* bursts: `--bursts` scripted bursts of 5 texts 40 ms apart (within 200 ms), each from a new
  sender, the next once the last is settled: model calls and replies per burst.

`--root` runs another checkout's service (e.g. `git archive main | tar -x -C /tmp/parley-main`)
for before/after figures; it must accept the same variables.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/debounce.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(ROOT))

from service.db import create_engine  # noqa: E402
from service.models import ReplyJob  # noqa: E402
from tests.conftest import PUBLIC_BASE_URL, TWILIO_SID, TWILIO_TOKEN  # noqa: E402
from tests.fakes import FakeProviders  # noqa: E402
from tests.helpers import post_twilio, twilio_form  # noqa: E402
from tests.processes import parley_env, provider_variables, serving, stop  # noqa: E402

BURST = ["hi", "I ordered a cake", "for Saturday", "chocolate", "can it be lemon?"]


async def settled(database_url: str) -> None:
    """Until no job is queued or running."""
    engine = create_engine(database_url)
    try:
        while True:
            async with engine.connect() as connection:
                busy = await connection.scalar(
                    select(func.count())
                    .select_from(ReplyJob)
                    .where(ReplyJob.status.in_(["queued", "running"]))
                )
            if not busy:
                return
            await asyncio.sleep(0.02)
    finally:
        await engine.dispose()


async def text(client: httpx.AsyncClient, sender: str, body: str) -> None:
    response = await post_twilio(client, twilio_form(Body=body, From=sender))
    assert response.status_code == 200, response.text


async def singles(client: httpx.AsyncClient, fake: FakeProviders, count: int) -> list[float]:
    latencies = []
    for n in range(count):
        before = len(fake.twilio_sent)
        started = time.monotonic()
        await text(client, f"+1555100{n:04d}", "what are your opening hours?")
        await fake.wait_for_async(lambda b=before: len(fake.twilio_sent) > b, 30, 0.002)
        latencies.append(time.monotonic() - started)
    return latencies


async def bursts(
    client: httpx.AsyncClient, fake: FakeProviders, database_url: str, count: int
) -> list[tuple[int, int]]:
    """(model calls, replies) of each burst."""
    figures = []
    for n in range(count):
        calls, sent = len(fake.openai_requests), len(fake.twilio_sent)
        for i, body in enumerate(BURST):
            if i:
                await asyncio.sleep(0.04)
            await text(client, f"+1555200{n:04d}", body)
        await settled(database_url)
        figures.append((len(fake.openai_requests) - calls, len(fake.twilio_sent) - sent))
    return figures


async def measure(args: argparse.Namespace, debounce: str, fake: FakeProviders) -> str:
    with tempfile.TemporaryDirectory(prefix="parley-debounce-") as scratch:
        database_url = f"sqlite+aiosqlite:///{scratch}/bench.db"
        env = parley_env(
            PYTHONPATH=str(args.root),
            DATABASE_URL=database_url,
            PUBLIC_BASE_URL=PUBLIC_BASE_URL,
            **provider_variables(
                fake.base_url,
                account_sid=TWILIO_SID,
                auth_token=TWILIO_TOKEN,
                openai_key="bench-key",
                model="gpt-bench",
            ),
            REPLY_DEBOUNCE_S=debounce,
            REPLY_RATE_LIMIT="1000000/hour",
            LOG_LEVEL="WARNING",
        )
        with serving(env, Path(scratch)) as (port, process):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                latencies = await singles(client, fake, args.singles)
                burst_figures = await bursts(client, fake, database_url, args.bursts)
            stop(process)
    calls = [c for c, _ in burst_figures]
    replies = [r for _, r in burst_figures]
    return (
        f"| {debounce} | {statistics.median(latencies):.2f} s | {max(latencies):.2f} s "
        f"| {statistics.mean(calls):.1f} ({min(calls)}-{max(calls)}) "
        f"| {statistics.mean(replies):.1f} ({min(replies)}-{max(replies)}) |"
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--singles", type=int, default=10)
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--model-latency", type=float, default=1.0)
    parser.add_argument("--debounce", default="0,1.5", help="REPLY_DEBOUNCE_S values")
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose service to run")
    args = parser.parse_args()
    rows = []
    async with FakeProviders() as fake:
        fake.openai_delay = args.model_latency
        for debounce in args.debounce.split(","):
            rows.append(await measure(args, debounce, fake))
    print(f"model latency {args.model_latency} s, {args.singles} singles, {args.bursts} bursts")
    print("| REPLY_DEBOUNCE_S | webhook → reply p50 | max | model calls per burst | replies |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
