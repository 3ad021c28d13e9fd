"""Throughput of Parley's SMS webhook against two baselines, side by side, in one run.

    python bench/webhook.py [--seconds 10] [--connections 50] [--database sqlite|postgresql]

Each target runs as its own uvicorn process on 127.0.0.1 with a fresh database, and `wrk`
(Debian package `wrk`) replays pre-signed, distinct Twilio webhooks at it. Printed: requests per
second, non-2xx answers, and the ratio to the one-insert baseline. For Parley it also checks
that every 200 left exactly one stored message and one reply job (nothing lost, nothing doubled).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx
from sqlalchemy import func, select

from service.db import create_engine
from service.models import Message, ReplyJob
from service.testing import inbound_form, sign

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token-0123456789abcdef"
PUBLIC = "https://parley.example.com"
ACCOUNT = "AC" + "b" * 32


def write_requests(path: Path, count: int) -> None:
    """`count` distinct signed webhooks from 100 senders to one number."""
    url = PUBLIC + "/webhooks/twilio/sms"
    with path.open("w") as out:
        for i in range(count):
            sid = "SM" + secrets.token_hex(16)
            form = inbound_form(
                f"bench message {i}", f"+1555{i % 100:07d}", "+15559990000", sid, ACCOUNT
            )
            out.write(f"{sign(TOKEN, url, form)}\t{urlencode(form)}\n")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_target(name: str, port: int, database_url: str, workdir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "PUBLIC_BASE_URL": PUBLIC,
        "EMBEDDED_WORKER": "false",
        "REPLY_DEBOUNCE_S": "0",  # the figures in the README are without SPEC §12's debounce
        "LOG_LEVEL": "INFO",
        "PYTHONPATH": str(ROOT),
    }
    if name == "parley":
        command = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    else:
        command = [
            sys.executable, "-m", "uvicorn", "--factory", f"bench.baselines:{name}",
            "--port", str(port), "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
    log = (workdir / f"{name}.log").open("wb")
    return subprocess.Popen(command, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}/webhooks/twilio/sms", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"target on port {port} did not start")


def run_wrk(
    port: int, requests: Path, seconds: float, connections: int, once: bool = False
) -> tuple[float, int, int]:
    """(requests per second, completed requests, non-2xx answers). With `once`, each line of
    `requests` is posted once and wrk is stopped when all are answered (or after `seconds`);
    the figures are then those of the webhooks alone, timed from wrk's start."""
    command = [
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
        "-s", str(ROOT / "bench" / "requests.lua"), f"http://127.0.0.1:{port}",
        "--", str(requests), "1", *(["once"] if once else []),
    ]  # fmt: skip
    started = time.monotonic()
    took = float(seconds)
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as wrk:
        assert wrk.stdout is not None
        output = []
        for line in wrk.stdout:
            output.append(line)
            if once and line.startswith("all answered"):
                took = time.monotonic() - started
                wrk.send_signal(signal.SIGINT)  # wrk stops and prints its summary
        stdout = "".join(output)
    if wrk.returncode != 0:
        raise SystemExit(f"wrk failed ({wrk.returncode}):\n{stdout}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", stdout).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"(\d+) requests in", stdout).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", stdout)
    if once and (posted := re.search(r"^posted (\d+)", stdout, re.M)):
        done = int(posted.group(1))
        rate = done / took
    return rate, done, int(bad.group(1)) if bad else 0


async def stored_counts(database_url: str) -> tuple[int, int, int]:
    engine = create_engine(database_url)
    async with engine.connect() as connection:
        messages = (
            await connection.execute(select(func.count()).select_from(Message))
        ).scalar_one()
        distinct = (
            await connection.execute(select(func.count(func.distinct(Message.provider_message_id))))
        ).scalar_one()
        jobs = (await connection.execute(select(func.count()).select_from(ReplyJob))).scalar_one()
    await engine.dispose()
    return int(messages), int(distinct), int(jobs)


def fresh_database(kind: str, workdir: Path, name: str) -> str:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{workdir / name}.db"
    admin = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
    db = f"parley_bench_{name}_{secrets.token_hex(3)}"
    subprocess.run(["psql", admin, "-qc", f'CREATE DATABASE "{db}"'], check=True)
    return admin.replace("postgresql://", "postgresql+asyncpg://").rsplit("/", 1)[0] + f"/{db}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    workdir = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    requests = workdir / "requests.tsv"
    warmup = workdir / "warmup.tsv"
    write_requests(requests, 12_000 * args.seconds)
    write_requests(warmup, 20_000)
    results: dict[str, tuple[float, int, int]] = {}
    for name in ("bare", "one_insert", "one_insert_plain", "parley"):
        url = fresh_database(args.database, workdir, name)
        port = free_port()
        process = start_target(name, port, url, workdir)
        try:
            wait_ready(port)
            _, warm_done, warm_bad = run_wrk(port, warmup, 2, args.connections)
            results[name] = run_wrk(port, requests, args.seconds, args.connections)
        finally:
            process.terminate()
            process.wait(timeout=30)
        if name == "parley":
            messages, distinct, jobs = asyncio.run(stored_counts(url))
            accepted = results[name][1] - results[name][2] + warm_done - warm_bad
            print(
                f"parley stored {messages} messages ({distinct} distinct) and {jobs} jobs;"
                f" wrk saw {accepted} answered 200 (requests in flight when wrk stops"
                " are stored, not counted)"
            )
    baseline = max(results["one_insert"][0], results["one_insert_plain"][0])
    print(
        f"\n{args.database}, wrk -t1 -c{args.connections} -d{args.seconds}s, {os.cpu_count()} cores"
    )
    print(f"{'target':<12}{'req/s':>10}{'non-2xx':>10}{'vs best one-insert':>21}")
    for name, (rate, _, bad) in results.items():
        print(f"{name:<12}{rate:>10.0f}{bad:>10}{rate / baseline:>20.2f}x")


if __name__ == "__main__":
    main()
