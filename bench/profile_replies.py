"""Where a reply job's CPU goes, and how many transactions and statements it runs, measured
on a real `parley serve` answering a queue of messages with zero-latency fakes.

    python bench/profile_replies.py [--messages 3000] [--rate 100] [--count-messages 500]
                                    [--out docs/profile-before] [--database-url …]

1. `--messages` webhooks are stored by Parley's intake alone (EMBEDDED_WORKER=false); then
   `parley serve` with its worker answers them while `py-spy record --native --format raw`
   samples it (attached once the worker has started; stopped once the last reply reached the
   fake Twilio). The raw profile is kept as `<out>.pyspy.txt` and tabulated by
   bench/profile_table.py.
2. `--count-messages` more are answered the same way by `python -m bench.sqlcount serve`,
   which counts SQLAlchemy's events (transactions, pool checkouts, statements by kind); the
   counts of a start-and-stop with nothing to answer are subtracted, and the rest is divided
   by the jobs the log reports.

On PostgreSQL (`--database-url`) each pool checkout is also a pre-ping round trip, which
SQLAlchemy's statement events do not see. Prints markdown, for docs/PROFILE-*.md. Same
providers, settings and checks as bench/replies.py (every message answered exactly once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.loadgen import webhooks  # noqa: E402
from bench.profile_table import markdown, tabulate  # noqa: E402
from bench.replies import (  # noqa: E402
    Databases,
    Fake,
    Run,
    Serve,
    load_note,
    parley_variables,
    prefill,
    verify,
    wait_replies,
)


async def profiled(run: Run, out: Path) -> tuple[int, float, str]:
    """(replies while sampled, CPU seconds of serve meanwhile, the check's line)."""
    hooks = webhooks(run.args.messages, tag="-profile")
    database_url = await prefill(run, "profile", hooks)
    async with Fake(0.0) as fake:
        variables = parley_variables(database_url, fake, True)
        async with Serve("profile", variables, run.workdir) as serve:
            spy = subprocess.Popen(  # noqa: ASYNC220 - returns at once; stopped below
                [
                    str(Path(sys.executable).with_name("py-spy")), "record",
                    "--pid", str(serve.pid), "--rate", str(run.args.rate),
                    *(["--native"] if run.args.native else ["--nonblocking"]),
                    "--format", "raw", "-o", str(out),
                ],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            started, cpu_before = time.monotonic(), serve.cpu()
            await wait_replies(fake.sms, hooks, run.args.drain_timeout)
            used = serve.cpu() - cpu_before
            spy.send_signal(signal.SIGINT)  # py-spy writes the profile and exits
            await asyncio.to_thread(spy.wait, 60)
        verdict = await verify(database_url, hooks, fake.sms)
    return fake.sms.replies_between(started, math.inf), used, verdict.line()


async def counted(run: Run, messages: int, name: str) -> tuple[dict[str, Counter[str]], int]:
    """SQLAlchemy's event counts of one `bench.sqlcount serve` run, and the jobs it logged."""
    hooks = webhooks(messages, tag=f"-{name}")
    database_url = await prefill(run, name, hooks)
    out = run.workdir / f"{name}.json"
    async with Fake(0.0) as fake:
        variables = {
            **parley_variables(database_url, fake, True),
            "AUTO_MIGRATE": "false",
            "BENCH_SQLCOUNT_OUT": str(out),
        }
        async with Serve(name, variables, run.workdir, module="bench.sqlcount") as serve:
            await wait_replies(fake.sms, hooks, run.args.drain_timeout)
        log = serve.log.read_text(errors="replace")
    data = json.loads(out.read_text())
    jobs = log.count("reply job conversation=")
    return {k: Counter(v) for k, v in data.items()}, jobs


def per_job(busy: dict[str, Counter[str]], idle: dict[str, Counter[str]], jobs: int) -> str:
    lines = [f"Jobs: {jobs} (one message each, every message from a new sender).", ""]
    for section in ("events", "statements"):
        lines += [f"| {section} | total | start-up only | per job |", "|---|---:|---:|---:|"]
        for key, total in busy[section].most_common():
            overhead = idle[section].get(key, 0)
            lines.append(f"| {key} | {total} | {overhead} | {(total - overhead) / jobs:.2f} |")
        lines.append("")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="parley-profile-"))
    run = Run(args, workdir, Databases(args.database_url, workdir))
    out = Path(args.out).with_suffix(".pyspy.txt") if args.out else workdir / "profile.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"<!-- {load_note()} at the start; logs in {workdir} -->", flush=True)
    try:
        replies, cpu, check = await profiled(run, out)
        busy, jobs = await counted(run, args.count_messages, "sqlcount")
        idle, _ = await counted(run, 0, "sqlcount-idle")
    finally:
        run.databases.drop_all()
    kind = run.databases.kind
    print(f"\n{os.cpu_count()} cores, {kind}, zero-latency fakes; {load_note()} at the end.")
    print(f"Under py-spy: {replies} replies, {cpu:.1f} CPU-seconds of `parley serve` by /proc: "
          f"{cpu / max(replies, 1) * 1000:.1f} ms a reply. Check: {check}\n")  # fmt: skip
    print(markdown(tabulate(out), replies, args.rate, cpu / max(replies, 1) * 1000))
    print("\n**Transactions and statements per reply job** (bench/sqlcount.py)\n")
    print(per_job(busy, idle, jobs))
    print(f"raw profile: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--count-messages", type=int, default=500)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples a second")
    parser.add_argument(
        "--native",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="py-spy --native (pauses the process per sample; shows SQLite's C frames and what"
        " threads wait in) or --no-native: py-spy --nonblocking, Python frames only, lighter",
    )
    parser.add_argument("--out", help="keep the raw profile as <out>.pyspy.txt")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--database-url", help="postgresql+asyncpg://…/name; default SQLite")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
