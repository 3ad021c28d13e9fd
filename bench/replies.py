"""Reply throughput, CPU, latency and memory of a real `parley serve`, end to end, against the
baselines measured in the same run.

    python bench/replies.py [--seconds 10] [--messages 3000] [--connections 64]
                            [--database-url postgresql+asyncpg://postgres@127.0.0.1/parley_bench]
    python bench/replies.py --database-url postgresql+asyncpg://… --workers 1,2,4 [--only-workers]
    python bench/replies.py --model-latency 1 --senders 128 [--seconds 30]
    python bench/replies.py --only-drain [--messages 2000]   # CPU per reply, in a minute
    python bench/replies.py --only-latency 60,30             # webhook -> reply at these rates

Providers are bench/fastfakes.py in its own process: Twilio and an OpenAI-compatible model
that answer at once (or after `--model-latency` seconds), reached through the real SDKs. Every
provider is configured (Twilio, OpenAI, SendGrid), as in production. Every phase starts its
processes on a fresh database (SQLite files in a temporary folder; with `--database-url`, fresh
PostgreSQL databases on that server, dropped at the end).

Zero-latency model (the default), each phase on a fresh database:

1. baselines, driven by `wrk -t1 -c<connections>` with distinct signed webhooks: a bare
   form parse + signature check, and the same with one ORM insert per request
   (bench/baselines.py; the faster of its two engine set-ups counts);
2. Parley's intake alone (`EMBEDDED_WORKER=false`), the same way: its capacity;
3. drain: `--messages` webhooks stored by the intake alone, then `parley serve` with its
   worker answers them: replies/s and CPU per reply of the reply work alone;
4. live: `parley serve` with its worker takes `--messages` webhooks from wrk as fast as it
   accepts them and answers them: intake req/s while replying, replies/s end to end, CPU per
   reply (intake included), RSS idle and under load;
5. latency: webhooks posted at a steady rate, at half the intake capacity of (2) and at half
   the reply capacity of (3); webhook -> reply accepted by Twilio, p50 / p99.

6. with `--workers 1,2,4` (PostgreSQL): `parley serve` (EMBEDDED_WORKER=false) plus N
   `parley worker` processes answer a queue of `--messages`, for each N: replies/s, the
   ratio to the first N, CPU per reply of the workers and of their database's PostgreSQL
   backends, the peak number of connections and the job attempts that failed (with the
   default pools, 4 workers exceed max_connections=100: other users of the server suffer).

After each phase with a worker, Parley is stopped and the database and the fake's record are
checked: every message answered, exactly one reply each, sent once.

With `--model-latency S`: the inline peer (bench/peer_inline: Flask + gunicorn sync workers,
the model called inside the webhook) and Parley, side by side, each texted by `--senders`
people in closed loops (each texts again once answered) for `--seconds`: replies/s of each,
the ratio, webhooks slower than Twilio's 15 s, model calls in flight, RSS under that load.

CPU figures are utime + stime of the process (all its threads) from /proc/<pid>/stat.
REPLY_DEBOUNCE_S=0; MODEL_CALLS_LIMIT and REPLY_RATE_LIMIT are set far above what a run
reaches: both are still checked on every reply, as by default, but no limit meant for people
shapes a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Self

from sqlalchemy import func, select
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/replies.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(ROOT))

from bench.burst import cpu_s, machine_jiffies, postgres_cpu_s, rss_kib  # noqa: E402
from bench.loadgen import (  # noqa: E402
    ACCOUNT,
    PUBLIC,
    TOKEN,
    Conversations,
    Posted,
    SmsLog,
    Webhook,
    conversations,
    paced,
    webhooks,
    write_wrk_file,
)
from bench.webhook import run_wrk, start_target, wait_ready  # noqa: E402
from service.db import create_engine  # noqa: E402
from service.models import Message, ReplyJob  # noqa: E402
from service.settings import Settings, pool_size  # noqa: E402
from tests.processes import free_port, parley_env, provider_variables, wait_healthy  # noqa: E402

TWILIO_WEBHOOK_TIMEOUT_S = 15.0
RSS_SAMPLE_S = 0.2
WARM_UP_MESSAGES = 3  # answered before a latency phase's clock starts


# ------------------------------------------------------------------ small measurements


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank); unanswered messages count as infinitely late."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ms(value: float) -> str:
    return "never" if math.isinf(value) else f"{value * 1000:.1f} ms"


def family(pid: int) -> list[int]:
    """`pid` and its live children (gunicorn's master and workers)."""
    children = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(proc.name))
    return [pid, *children]


def family_cpu_s(pid: int) -> float:
    return sum(_quiet(cpu_s, p, 0.0) for p in family(pid))


def family_rss_mib(pid: int) -> float:
    return sum(_quiet(rss_kib, p, 0) for p in family(pid)) / 1024


def _quiet(measure: object, pid: int, default: float) -> float:
    try:
        return float(measure(pid))  # type: ignore[operator]
    except (OSError, RuntimeError):
        return default  # the process ended meanwhile


class _Sampler:
    """Runs `sample()` every RSS_SAMPLE_S while the block runs, and once more at its end."""

    _task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        raise NotImplementedError

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(RSS_SAMPLE_S)

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sample()


class DatabaseCpu(_Sampler):
    """CPU seconds of the PostgreSQL backends serving one database while the block runs,
    sampled every RSS_SAMPLE_S (a backend's title names its database; one that closes
    between samples loses at most its last interval). Other databases on the server, such
    as other people's tests, are not counted."""

    def __init__(self, database: str) -> None:
        self.marker = f" {database} "
        self.start: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.peak_connections = 0

    def _backends(self) -> dict[int, float]:
        found = {}
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError, RuntimeError):
                    if self.marker in (proc / "cmdline").read_text(errors="replace"):
                        found[int(proc.name)] = cpu_s(int(proc.name))
        return found

    def sample(self) -> None:
        backends = self._backends()
        self.last.update(backends)
        self.peak_connections = max(self.peak_connections, len(backends))

    @property
    def seconds(self) -> float:
        return sum(cpu - self.start.get(pid, 0.0) for pid, cpu in self.last.items())

    async def __aenter__(self) -> Self:
        self.start = self._backends()
        self.last = dict(self.start)
        return await super().__aenter__()


class PeakRss(_Sampler):
    """The largest RSS of a process (and its children) while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mib = 0.0

    def sample(self) -> None:
        self.peak_mib = max(self.peak_mib, family_rss_mib(self.pid))


# ------------------------------------------------------------------ databases and processes


class Databases:
    """A fresh database per phase: SQLite files, or PostgreSQL databases named after
    `--database-url`'s, created on its server and dropped at the end."""

    def __init__(self, url: str | None, workdir: Path) -> None:
        self.url = url
        self.workdir = workdir
        self.created: list[str] = []

    @property
    def kind(self) -> str:
        return "postgresql" if self.url else "sqlite"

    def fresh(self, phase: str) -> str:
        if not self.url:
            return f"sqlite+aiosqlite:///{self.workdir / phase}.db"
        base = make_url(self.url)
        name = f"{base.database or 'parley_bench'}_{phase}_{secrets.token_hex(3)}"
        self._psql(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return base.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        for name in self.created:
            self._psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', check=False)

    def _psql(self, sql: str, check: bool = True) -> str:
        assert self.url
        admin = make_url(self.url).set(drivername="postgresql", database="postgres")
        result = subprocess.run(
            ["psql", admin.render_as_string(hide_password=False), "-Atqc", sql],
            check=check,
            capture_output=True,
            text=True,
        )
        return result.stdout

    def query(self, sql: str) -> list[str]:
        """The first row of a query on the server, as text."""
        return self._psql(sql).strip().split("|")


class Fake:
    """bench/fastfakes.py in its own process; its events feed `sms`."""

    def __init__(self, model_latency_s: float) -> None:
        self.model_latency_s = model_latency_s
        self.sms = SmsLog()
        self.process: asyncio.subprocess.Process | None = None
        self.port = 0
        self._reader: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Fake:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.fastfakes",
            "--model-latency",
            str(self.model_latency_s),
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert self.process.stdout is not None
        ready = await asyncio.wait_for(self.process.stdout.readline(), 30)
        self.port = int(ready.split()[1])
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for line in self.process.stdout:
            self.sms.on_line(line.decode())

    async def __aexit__(self, *_: object) -> None:
        assert self.process is not None and self._reader is not None
        if self.process.returncode is not None:  # it died during the phase: say so
            print(f"fake providers exited early, code {self.process.returncode}", flush=True)
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        await self.process.wait()
        await self._reader


class Serve:
    """One `parley serve` (or, with `command="worker"`, `parley worker`) process, as an
    operator runs it; with `--pin`, under `taskset -c <cpu>`, each process started taking the
    next CPU of `pin_cpus`."""

    pin_cpus: ClassVar[Iterator[int] | None] = None

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        workdir: Path,
        module: str = "service",
        command: str = "serve",
    ) -> None:
        self.name = name
        self.env = env
        self.module = module  # `python -m <module> serve`: bench.sqlcount wraps Parley
        self.command = command
        self.workdir = workdir
        self.port = free_port()
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Returns once /healthz answers and, with a worker, the worker has started."""
        serves = self.command == "serve"
        cpu = next(Serve.pin_cpus) if Serve.pin_cpus is not None else None
        self.process = subprocess.Popen(
            (["taskset", "-c", str(cpu)] if cpu is not None else [])
            + [sys.executable, "-m", self.module, self.command]
            + (["--port", str(self.port)] if serves else []),
            env=self.env,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        if serves:
            wait_healthy(self.port, self.process, timeout=60)
        if not serves or self.env.get("EMBEDDED_WORKER") != "false":
            deadline = time.monotonic() + 60
            while "reply worker" not in self.log.read_text(errors="replace"):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit(f"{self.name}: the worker did not start; see {self.log}")
                time.sleep(0.02)

    def cpu(self) -> float:
        return cpu_s(self.pid)

    def rss_mib(self) -> float:
        return rss_kib(self.pid) / 1024

    async def __aenter__(self) -> Serve:
        await asyncio.to_thread(self.start)  # the fake's events keep being read meanwhile
        return self

    async def __aexit__(self, *_: object) -> None:
        await asyncio.to_thread(self.stop)

    def stop(self) -> int:
        assert self.process is not None
        self.process.terminate()
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def bench_providers(base_url: str) -> dict[str, str]:
    """Twilio and the model at the fast fake, for Parley and the inline peer alike."""
    return provider_variables(
        base_url, account_sid=ACCOUNT, auth_token=TOKEN, openai_key="bench-key", model="gpt-bench"
    )


def parley_variables(database_url: str, fake: Fake | None, worker: bool) -> dict[str, str]:
    """Every provider configured, as in production; limits meant for people out of reach."""
    fake_url = fake.base_url if fake else "http://127.0.0.1:9"
    variables = {
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url,
        "PUBLIC_BASE_URL": PUBLIC,
        **bench_providers(fake_url),
        "SENDGRID_API_KEY": "SG.bench-key",
        "SENDGRID_API_BASE_URL": fake_url,
        "SENDGRID_INBOUND_USER": "bench",
        "SENDGRID_INBOUND_PASSWORD": "bench-password",
        "EMBEDDED_WORKER": "true" if worker else "false",
        "REPLY_DEBOUNCE_S": "0",
        "MODEL_CALLS_LIMIT": "1000000000/hour",  # counted, as by default, but never reached
        "REPLY_RATE_LIMIT": "1000000/hour",
        "LOG_LEVEL": "INFO",
    }
    if concurrency := os.environ.get("WORKER_CONCURRENCY"):
        variables["WORKER_CONCURRENCY"] = concurrency
    return parley_env(**variables)


# ------------------------------------------------------------------ checking the outcome


@dataclass
class Verdict:
    """What the database and the fake Twilio say, once Parley has stopped."""

    posted: int
    user_messages: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    jobs: Counter[str] = field(default_factory=Counter)
    doubled_replies: int = 0  # messages with more than one stored reply
    doubled_sends: int = 0  # SMS the fake Twilio accepted twice
    missing_at_twilio: int = 0  # posted messages whose reply never reached the fake

    @property
    def clean(self) -> bool:
        return (
            self.user_messages == Counter({"answered": self.posted})
            and not (self.doubled_replies or self.doubled_sends or self.missing_at_twilio)
            and set(self.jobs) <= {"done"}
        )

    def line(self) -> str:
        verdict = "yes" if self.clean else "NO"
        return (
            f"every message answered exactly once: {verdict} (posted {self.posted}; messages "
            f"{dict(self.user_messages)}; replies {dict(self.replies)}; jobs {dict(self.jobs)}; "
            f"doubled replies {self.doubled_replies}, doubled sends {self.doubled_sends}, "
            f"replies missing at Twilio {self.missing_at_twilio})"
        )


async def verify(database_url: str, hooks: list[Webhook], sms: SmsLog) -> Verdict:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:

            async def grouped(column: object, *where: object) -> Counter[str]:
                rows = await connection.execute(
                    select(column, func.count()).where(*where).group_by(column)  # type: ignore[call-overload]
                )
                return Counter({str(k): int(v) for k, v in rows})

            verdict = Verdict(len(hooks))
            verdict.user_messages = await grouped(Message.status, Message.sender == "user")
            verdict.replies = await grouped(Message.status, Message.sender == "assistant")
            verdict.jobs = await grouped(ReplyJob.status)
            per_message = await grouped(Message.reply_to_id, Message.sender == "assistant")
            verdict.doubled_replies = sum(n > 1 for n in per_message.values())
    finally:
        await engine.dispose()
    verdict.doubled_sends = sms.doubled
    verdict.missing_at_twilio = sum(sms.sent_at(h) is None for h in hooks)
    return verdict


# ------------------------------------------------------------------ the phases


@dataclass
class Rate:
    name: str
    per_s: float
    requests: int
    cpu_s: float
    rss_mib: float = 0.0

    @property
    def cpu_ms_each(self) -> float:
        return self.cpu_s / max(self.requests, 1) * 1000


@dataclass
class Run:
    """Shared by the phases: arguments, folders, databases, the webhook files."""

    args: argparse.Namespace
    workdir: Path
    databases: Databases
    notes: list[str] = field(default_factory=list)

    def wrk_file(self, name: str, hooks: list[Webhook]) -> Path:
        return write_wrk_file(self.workdir / f"{name}.tsv", hooks)


async def wrk_rate(run: Run, name: str, port: int, pid: int, hooks: Path) -> Rate:
    """A 1 s warm-up, then `--seconds` of wrk; CPU of `pid` over the measured part."""
    args = run.args
    warmup = run.wrk_file(f"{name}-warmup", webhooks(4000, tag=f"-{name}-warmup"))
    await asyncio.to_thread(run_wrk, port, warmup, 1, args.connections)
    before = cpu_s(pid)
    rate, done, bad = await asyncio.to_thread(run_wrk, port, hooks, args.seconds, args.connections)
    if bad:
        run.notes.append(f"{name}: {bad} answers were not 2xx")
    return Rate(name, rate, done, cpu_s(pid) - before, rss_kib(pid) / 1024)


async def baselines(run: Run) -> dict[str, Rate]:
    hooks = run.wrk_file("throughput", webhooks(6000 * run.args.seconds, tag="-throughput"))
    results = {}
    for name in ("bare", "one_insert", "one_insert_plain"):
        port = free_port()
        process = start_target(name, port, run.databases.fresh(name), run.workdir)
        try:
            await asyncio.to_thread(wait_ready, port)
            results[name] = await wrk_rate(run, name, port, process.pid, hooks)
        finally:
            process.terminate()
            process.wait(timeout=30)
    async with Serve(
        "intake", parley_variables(run.databases.fresh("intake"), None, False), run.workdir
    ) as serve:
        results["intake"] = await wrk_rate(run, "intake", serve.port, serve.pid, hooks)
    return results


@dataclass
class Replying:
    """One phase in which Parley answered messages."""

    name: str
    answered: int  # replies in the measured window
    seconds: float
    cpu_s: float
    verdict: Verdict
    intake: Rate | None = None
    idle_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    model_max_in_flight: int = 0

    @property
    def per_s(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_each(self) -> float:
        return self.cpu_s / max(self.answered, 1) * 1000


async def wait_replies(sms: SmsLog, hooks: list[Webhook], timeout_s: float) -> float:
    """Until every hook's reply reached the fake (or the timeout); the time of the last one."""
    deadline = time.monotonic() + timeout_s
    # The fake's record fills from its pipe; polling it is simpler than a waiter per hook.
    while time.monotonic() < deadline and any(sms.sent_at(h) is None for h in hooks):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return max((t for h in hooks if (t := sms.sent_at(h)) is not None), default=math.nan)


async def prefill(run: Run, name: str, hooks: list[Webhook]) -> str:
    """A fresh database holding `hooks`, stored by Parley's intake alone (no worker)."""
    database_url = run.databases.fresh(name)
    variables = parley_variables(database_url, None, False)
    async with Serve(f"{name}-intake", variables, run.workdir) as intake:
        if hooks:  # else only the schema
            wrk_file = run.wrk_file(name, hooks)
            await asyncio.to_thread(run_wrk, intake.port, wrk_file, 120, run.args.connections, True)
    return database_url


async def drain(run: Run) -> Replying:
    """Replies alone: the intake stores `--messages` webhooks first, then the worker runs."""
    hooks = webhooks(run.args.messages, tag="-drain")
    database_url = await prefill(run, "drain", hooks)
    async with Fake(0.0) as fake:
        async with Serve("drain", parley_variables(database_url, fake, True), run.workdir) as serve:
            started, cpu_before = time.monotonic(), serve.cpu()
            async with PeakRss(serve.pid) as peak:
                last = await wait_replies(fake.sms, hooks, run.args.drain_timeout)
            used = serve.cpu() - cpu_before
        verdict = await verify(database_url, hooks, fake.sms)
    answered = fake.sms.replies_between(started, math.inf)
    return Replying("drain", answered, last - started, used, verdict, peak_rss_mib=peak.peak_mib)


async def live(run: Run) -> Replying:
    """Intake and replies at once: wrk posts `--messages` webhooks as fast as they are taken."""
    hooks = webhooks(run.args.messages, tag="-live")
    wrk_file = run.wrk_file("live", hooks)
    database_url = run.databases.fresh("live")
    async with Fake(0.0) as fake:
        async with Serve("live", parley_variables(database_url, fake, True), run.workdir) as serve:
            await asyncio.sleep(1.0)  # start-up settles: this is "idle"
            idle = serve.rss_mib()
            started, cpu_before = time.monotonic(), serve.cpu()
            async with PeakRss(serve.pid) as peak:
                rate, posted, bad = await asyncio.to_thread(
                    run_wrk, serve.port, wrk_file, 120, run.args.connections, True
                )
                if bad:
                    run.notes.append(f"live: {bad} webhooks were not answered 2xx")
                last = await wait_replies(fake.sms, hooks, run.args.drain_timeout)
            used = serve.cpu() - cpu_before
        verdict = await verify(database_url, hooks, fake.sms)
    intake = Rate("intake while replying", rate, posted, 0.0)
    answered = fake.sms.replies_between(started, math.inf)
    return Replying("live", answered, last - started, used, verdict, intake, idle, peak.peak_mib)


@dataclass
class Latency:
    rate: float
    basis: str
    reply_s: list[float]  # inf: never answered within the timeout
    ack_s: list[float]
    late_start_s: float  # how far behind schedule the last webhook went out
    verdict: Verdict
    cpu_s: float = 0.0  # the serve process's, from the first paced webhook to the last reply
    seconds: float = 0.0

    def cpu_line(self) -> str:
        busy = self.cpu_s / self.seconds if self.seconds else math.nan
        return (
            f"{'':9}serve CPU {self.cpu_s / max(1, len(self.reply_s)) * 1000:.2f} ms a message"
            f" (intake and reply), one process {busy:.0%} busy"
        )

    def line(self) -> str:
        answered = sum(not math.isinf(v) for v in self.reply_s)
        p50, p99 = quantile(self.reply_s, 0.5), quantile(self.reply_s, 0.99)
        return (
            f"{self.rate:7.1f} msg/s ({self.basis}), {len(self.reply_s)} messages: "
            f"p50 {ms(p50)}, p99 {ms(p99)} (targets 20 / 100 ms: {p50 / 0.020:.1f}x / "
            f"{p99 / 0.100:.1f}x); answered: {answered}; webhook ack p50 "
            f"{ms(quantile(self.ack_s, 0.5))}, p99 {ms(quantile(self.ack_s, 0.99))}; "
            f"last webhook {self.late_start_s:.1f} s behind schedule"
        )


async def latency(run: Run, rate: float, basis: str) -> Latency:
    count = max(200, round(rate * run.args.latency_seconds))
    hooks = webhooks(count, tag=f"-latency-{round(rate)}")
    database_url = run.databases.fresh(f"latency{round(rate)}")
    async with Fake(0.0) as fake:
        async with Serve(
            f"latency-{round(rate)}", parley_variables(database_url, fake, True), run.workdir
        ) as serve:
            await asyncio.sleep(1.0)
            # A process's first model call imports the openai SDK (~0.5 s, README
            # "Performance"): answered before the clock starts, so the figures are the steady
            # state's; the first reply's own latency is printed beside them.
            warm_up = webhooks(WARM_UP_MESSAGES, tag=f"-warm-up-{round(rate)}")
            first = await paced(serve.port, warm_up, 10.0, 1)
            await wait_replies(fake.sms, warm_up, run.args.drain_timeout)
            started, cpu_before = time.monotonic(), serve.cpu()
            posted = await paced(serve.port, hooks, rate, run.args.paced_connections)
            await wait_replies(fake.sms, hooks, run.args.drain_timeout)
            cpu_s, seconds = serve.cpu() - cpu_before, time.monotonic() - started
        verdict = await verify(database_url, [*warm_up, *hooks], fake.sms)
        first_s = _reply_s(first[0], fake.sms)
        print(f"latency {rate:.0f} msg/s: the process's first reply took {ms(first_s)}")
    reply_s = [_reply_s(p, fake.sms) for p in posted]
    ack_s = [p.ack_s if p.ack_s is not None and p.status == 200 else math.inf for p in posted]
    late = max((a - p.due for p in posted if (a := p.acked) is not None), default=math.nan)
    return Latency(rate, basis, reply_s, ack_s, late, verdict, cpu_s, seconds)


def _reply_s(posted: Posted, sms: SmsLog) -> float:
    sent = sms.sent_at(posted.hook)
    return math.inf if sent is None else sent - posted.due


@dataclass
class ScaleOut:
    workers: int
    replies: int
    seconds: float
    worker_cpu_s: float
    postgres_cpu_s: float
    machine_busy: float  # share of all cores' time
    verdict: Verdict
    peak_connections: int = 0
    failed_attempts: Counter[str] = field(default_factory=Counter)

    @property
    def per_s(self) -> float:
        return self.replies / self.seconds if self.seconds > 0 else 0.0


async def scale_out(run: Run, workers: int) -> ScaleOut:
    """`parley serve` (EMBEDDED_WORKER=false) + `workers` x `parley worker` answer a queue of
    `--messages`; timed from when the last worker has started."""
    hooks = webhooks(run.args.messages, tag=f"-scale{workers}")
    print(connection_budget(run, workers), flush=True)
    database_url = await prefill(run, f"scale{workers}", hooks)
    async with Fake(0.0) as fake:
        env = parley_variables(database_url, fake, False)
        async with Serve(f"scale{workers}-serve", env, run.workdir):
            processes = [
                Serve(f"scale{workers}-worker{i + 1}", env, run.workdir, command="worker")
                for i in range(workers)
            ]
            try:
                await asyncio.gather(*(asyncio.to_thread(p.start) for p in processes))
                started, machine_before = time.monotonic(), machine_jiffies()
                cpu_before = sum(p.cpu() for p in processes)
                async with DatabaseCpu(str(make_url(database_url).database)) as backends:
                    last = await wait_replies(fake.sms, hooks, run.args.drain_timeout)
                cpu = sum(p.cpu() for p in processes) - cpu_before
                pg = backends.seconds
                machine_after = machine_jiffies()
                failures = failed_attempts([p.log for p in processes])
            finally:
                await asyncio.gather(
                    *(asyncio.to_thread(p.stop) for p in processes if p.process is not None)
                )
        verdict = await verify(database_url, hooks, fake.sms)
    busy = (machine_after[0] - machine_before[0]) / max(machine_after[1] - machine_before[1], 1)
    replies = fake.sms.replies_between(started, math.inf)
    return ScaleOut(
        workers, replies, last - started, cpu, pg, busy, verdict,
        backends.peak_connections, failures,
    )  # fmt: skip


def failed_attempts(logs: list[Path]) -> Counter[str]:
    """Job attempts that did not end in a reply, by the first words of their error: "too many
    clients" means the processes' pools together exceeded PostgreSQL's max_connections."""
    failures: Counter[str] = Counter()
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if "attempt" in line and "failed (" in line:
                reason = line.split("failed (", 1)[1]
                failures[reason.split(")", 1)[-1].strip()[:60] or reason[:60]] += 1
    return failures


def connection_budget(run: Run, workers: int) -> str:
    """What the server allows against what `workers` processes may open."""
    allowed, used = run.databases.query(
        "SELECT current_setting('max_connections'), count(*) FROM pg_stat_activity"
    )
    concurrency = int(os.environ.get("WORKER_CONCURRENCY") or Settings().worker_concurrency)
    pool = int(os.environ.get("DB_POOL_SIZE") or 0) or pool_size(concurrency)
    return (
        f"PostgreSQL max_connections {allowed}, {used} in use before the run; "
        f"{workers} worker(s) + serve, each with a pool of {pool} (WORKER_CONCURRENCY "
        f"{concurrency}, no overflow), may open up to {(workers + 1) * pool} plus "
        f"{workers} LISTEN connections"
    )


def report_scale_out(results: list[ScaleOut]) -> None:
    one = results[0].per_s
    print("\nPostgreSQL scale-out: `parley serve` + N `parley worker`, a queue of messages:")
    print(f"  {'workers':>7}{'replies/s':>11}{'vs first':>10}{'worker CPU ms/reply':>21}"
          f"{'its PostgreSQL backends ms/reply':>34}{'machine busy':>14}")  # fmt: skip
    for item in results:
        each = max(item.replies, 1)
        print(
            f"  {item.workers:>7}{item.per_s:>11.1f}{item.per_s / one:>9.2f}x"
            f"{item.worker_cpu_s / each * 1000:>21.1f}{item.postgres_cpu_s / each * 1000:>34.1f}"
            f"{item.machine_busy:>14.0%}"
        )
    for item in results:
        print(f"  {item.workers} worker(s): peak {item.peak_connections} connections to its "
              f"database; failed job attempts: {dict(item.failed_attempts) or 'none'}")  # fmt: skip
        print(f"  {item.workers} worker(s): {item.verdict.line()}")


# ------------------------------------------------------------------ the inline peer


class Peer:
    """bench/peer_inline under gunicorn sync workers, (2 x cores) + 1 of them."""

    def __init__(self, fake: Fake, workdir: Path) -> None:
        self.workers = 2 * (os.cpu_count() or 1) + 1
        self.port = free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            **bench_providers(fake.base_url),
            "PUBLIC_BASE_URL": PUBLIC,
        }
        self.log = workdir / "peer.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Peer]:
        gunicorn = Path(sys.executable).with_name("gunicorn")
        self.process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; it is waited for below
            [
                str(gunicorn),
                "-w",
                str(self.workers),
                "-k",
                "sync",
                "-b",
                f"127.0.0.1:{self.port}",
                "bench.peer_inline.app:app",
            ],
            env=self.env,
            cwd=ROOT,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the master and its workers
        )
        try:
            await asyncio.to_thread(wait_ready, self.port)
            while len(family(self.pid)) < self.workers + 1:  # noqa: ASYNC110 (other processes)
                await asyncio.sleep(0.1)
            yield self
        finally:
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()


@dataclass
class Closed:
    """One system under the closed-loop load of `--senders` people."""

    name: str
    replies_per_s: float
    replies: int
    posted: int
    failed: int  # answered with another status than 200, or the connection failed
    past_15_s: int
    reply_p50_s: float
    reply_p99_s: float
    ack_p50_s: float
    ack_p99_s: float
    model_max_in_flight: int
    cpu_ms_each: float
    idle_rss_mib: float
    peak_rss_mib: float
    verdict: Verdict | None = None


def closed_figures(
    name: str, load: Conversations, sms: SmsLog, cpu: float, idle: float, peak: float
) -> Closed:
    """A webhook never acknowledged counts as waiting until the senders gave up."""
    seconds = load.ended - load.started
    replies = sms.replies_between(load.started, load.ended)
    waited = [p.ack_s if p.ack_s is not None else load.finished - p.due for p in load.posted]
    acked = [p.ack_s for p in load.posted if p.ack_s is not None]
    return Closed(
        name=name,
        replies_per_s=replies / seconds,
        replies=replies,
        posted=len(load.posted),
        failed=sum(p.acked is not None and p.status != 200 for p in load.posted),
        past_15_s=sum(w > TWILIO_WEBHOOK_TIMEOUT_S for w in waited),
        reply_p50_s=quantile(load.reply_s, 0.5),
        reply_p99_s=quantile(load.reply_s, 0.99),
        ack_p50_s=quantile(acked, 0.5),
        ack_p99_s=quantile(acked, 0.99),
        model_max_in_flight=sms.model_max_in_flight,
        cpu_ms_each=cpu / max(sms.count, 1) * 1000,
        idle_rss_mib=idle,
        peak_rss_mib=peak,
    )


async def peer_side_by_side(run: Run) -> list[Closed]:
    args = run.args
    results = []
    async with Fake(args.model_latency) as fake:
        peer = Peer(fake, run.workdir)
        async with peer.running():
            idle = family_rss_mib(peer.pid)
            cpu_before = family_cpu_s(peer.pid)
            async with PeakRss(peer.pid) as peak:
                load = await conversations(
                    peer.port, args.senders, args.seconds, fake.sms, args.closed_drain
                )
            cpu = family_cpu_s(peer.pid) - cpu_before
        name = f"inline peer ({peer.workers} gunicorn sync workers)"
        results.append(closed_figures(name, load, fake.sms, cpu, idle, peak.peak_mib))
    database_url = run.databases.fresh("closed")
    async with Fake(args.model_latency) as fake:
        async with Serve(
            "closed", parley_variables(database_url, fake, True), run.workdir
        ) as serve:
            await asyncio.sleep(1.0)
            idle = serve.rss_mib()
            cpu_before = serve.cpu()
            async with PeakRss(serve.pid) as peak:
                load = await conversations(
                    serve.port, args.senders, args.seconds, fake.sms, args.closed_drain
                )
            cpu = serve.cpu() - cpu_before
        hooks = [p.hook for p in load.posted]
        parley = closed_figures("parley serve", load, fake.sms, cpu, idle, peak.peak_mib)
        parley.verdict = await verify(database_url, hooks, fake.sms)
    results.append(parley)
    return results


# ------------------------------------------------------------------ the report


class MachineShare:
    """How the machine's CPU was spent from here on: this benchmark's own processes (itself,
    Parley, the fakes, wrk, gunicorn: all reaped by the end, so counted in its children's
    rusage), the PostgreSQL server, and everything else, which is other people's work on a
    shared machine and makes every figure of the run slower."""

    def __init__(self) -> None:
        self.machine = machine_jiffies()
        self.ours = _own_and_children_cpu_s()
        self.postgres = postgres_cpu_s()

    def line(self) -> str:
        tick = os.sysconf("SC_CLK_TCK")
        busy, total = machine_jiffies()
        busy_s = (busy - self.machine[0]) / tick
        core_s = max((total - self.machine[1]) / tick, 1e-9)
        ours = _own_and_children_cpu_s() - self.ours
        postgres = postgres_cpu_s() - self.postgres
        return (
            f"machine CPU during the run: {busy_s / core_s:.0%} of {core_s:.0f} core-seconds"
            f" busy: this benchmark's processes {ours:.0f} s, PostgreSQL (all databases)"
            f" {postgres:.0f} s,"
            f" other work on the machine {max(busy_s - ours - postgres, 0):.0f} s"
        )


def _own_and_children_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def report_zero(
    run: Run, rates: dict[str, Rate], drained: Replying, lived: Replying, latencies: list[Latency]
) -> None:
    bare = rates["bare"]
    insert = max(rates["one_insert"], rates["one_insert_plain"], key=lambda r: r.per_s)
    intake = rates["intake"]

    def vs(value: float, base: float) -> str:
        return f"{value / base:.2f}x" if base else "-"

    print(
        f"\n{run.databases.kind}, wrk -t1 -c{run.args.connections}, {os.cpu_count()} cores, "
        f"zero-latency fakes; {load_note()} at the end"
    )
    print(f"\n{'figure':<52}{'value':>14}   vs bare   vs one-insert   vs intake")
    rows = [
        ("bare parse + signature (req/s)", bare.per_s),
        (f"one ORM insert per request, {insert.name} (req/s)", insert.per_s),
        ("Parley intake alone, EMBEDDED_WORKER=false (req/s)", intake.per_s),
        ("Parley intake while replying (req/s)", lived.intake.per_s if lived.intake else 0),
        ("replies/s end to end (live)", lived.per_s),
        ("replies/s, worker alone (drain)", drained.per_s),
    ]
    for label, value in rows:
        print(
            f"{label:<52}{value:>14.1f}{vs(value, bare.per_s):>10}"
            f"{vs(value, insert.per_s):>16}{vs(value, intake.per_s):>12}"
        )
    print(f"\n{'CPU per request or reply':<52}{'ms':>14}   vs bare   vs one-insert   vs intake")
    cpu_rows = [
        ("bare parse + signature", bare.cpu_ms_each),
        (f"one ORM insert ({insert.name})", insert.cpu_ms_each),
        ("Parley intake alone, per webhook", intake.cpu_ms_each),
        ("Parley per reply, worker alone (drain)", drained.cpu_ms_each),
        ("Parley per reply, intake included (live)", lived.cpu_ms_each),
    ]
    for label, value in cpu_rows:
        print(
            f"{label:<52}{value:>14.2f}{vs(value, bare.cpu_ms_each):>10}"
            f"{vs(value, insert.cpu_ms_each):>16}{vs(value, intake.cpu_ms_each):>12}"
        )
    print("\nwebhook -> reply accepted by Twilio (REPLY_DEBOUNCE_S=0), paced open loop:")
    for item in latencies:
        print(f"  {item.line()}")
        print(f"  {item.cpu_line()}")
    print("\nmemory (RSS, every provider configured):")
    print(f"  bare baseline process under load:      {bare.rss_mib:6.1f} MiB")
    print(
        f"  parley serve idle:                     {lived.idle_rss_mib:6.1f} MiB "
        f"(target 120: {lived.idle_rss_mib / 120:.2f}x; {vs(lived.idle_rss_mib, bare.rss_mib)} "
        f"the bare baseline)"
    )
    print(f"  parley serve peak, live:               {lived.peak_rss_mib:6.1f} MiB")
    print(f"  parley serve peak, drain:              {drained.peak_rss_mib:6.1f} MiB")
    print("\nchecks:")
    for name, verdict in [("drain", drained.verdict), ("live", lived.verdict)] + [
        (f"latency {item.rate:.0f}/s", item.verdict) for item in latencies
    ]:
        print(f"  {name}: {verdict.line()}")
    for note in run.notes:
        print(f"  note: {note}")
    print(f"  logs: {run.workdir}")


def report_closed(run: Run, results: list[Closed]) -> None:
    peer, parley = results
    args = run.args
    print(
        f"\n{run.databases.kind}, model {args.model_latency:g} s, {args.senders} senders in "
        f"closed loops for {args.seconds} s, {os.cpu_count()} cores; {load_note()} at the end"
    )
    header = f"{'':<44}{'replies/s':>10}{'webhooks':>10}{'> 15 s':>8}{'reply p50/p99 s':>17}"
    print(
        header
        + f"{'ack p99 s':>11}{'model in flight':>17}{'CPU ms/reply':>14}{'RSS idle/peak MiB':>19}"
    )
    for item in results:
        print(
            f"{item.name:<44}{item.replies_per_s:>10.1f}{item.posted:>10}{item.past_15_s:>8}"
            f"{item.reply_p50_s:>8.2f} /{item.reply_p99_s:>6.2f}{item.ack_p99_s:>11.3f}"
            f"{item.model_max_in_flight:>17}{item.cpu_ms_each:>14.2f}"
            f"{item.idle_rss_mib:>10.1f} /{item.peak_rss_mib:>6.1f}"
        )
    ratio = parley.replies_per_s / peer.replies_per_s if peer.replies_per_s else math.inf
    print(
        f"\nParley / peer replies/s: {ratio:.1f}x (target >= 10x); webhooks past Twilio's "
        f"15 s: peer {peer.past_15_s}, Parley {parley.past_15_s} (target 0)"
    )
    print(
        f"Parley RSS under this load: {parley.peak_rss_mib:.1f} MiB (target <= 250: "
        f"{parley.peak_rss_mib / 250:.2f}x); idle {parley.idle_rss_mib:.1f} MiB "
        f"(target <= 120: {parley.idle_rss_mib / 120:.2f}x)"
    )
    if parley.verdict:
        print(f"check: {parley.verdict.line()}")
    print(f"logs: {run.workdir}")


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="parley-replies-"))
    run = Run(args, workdir, Databases(args.database_url, workdir))
    print(f"start: {load_note()}; logs in {workdir}", flush=True)
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0), reverse=True)
        Serve.pin_cpus = itertools.cycle(cpus)
        print(f"Parley's processes pinned with taskset, one CPU each, in turn: {cpus}")
    share = MachineShare()
    try:
        if args.model_latency > 0:
            results = await peer_side_by_side(run)
            report_closed(run, results)
            return 0 if results[1].verdict and results[1].verdict.clean else 1
        if args.only_drain:  # the quick figure: CPU per reply of the worker alone
            drained = await drain(run)
            print(
                f"drain: {drained.answered} replies, {drained.per_s:.1f} replies/s, "
                f"{drained.cpu_ms_each:.2f} ms CPU per reply, peak RSS "
                f"{drained.peak_rss_mib:.1f} MiB; {load_note()}\ncheck: {drained.verdict.line()}"
            )
            return 0 if drained.verdict.clean else 1
        if args.only_latency:
            paced_at = [
                await latency(run, float(rate), "as asked") for rate in args.only_latency.split(",")
            ]
            for item in paced_at:
                print(item.line())
                print(item.cpu_line())
            return 0 if all(item.verdict.clean for item in paced_at) else 1
        if args.only_workers:
            scaled = [await scale_out(run, int(n)) for n in args.workers.split(",")]
            report_scale_out(scaled)
            return 0 if all(item.verdict.clean for item in scaled) else 1
        rates = await baselines(run)
        print(f"baselines and intake done: {load_note()}", flush=True)
        drained = await drain(run)
        print(f"drain done: {drained.per_s:.1f} replies/s; {load_note()}", flush=True)
        lived = await live(run)
        print(f"live done: {lived.per_s:.1f} replies/s; {load_note()}", flush=True)
        latencies = [
            await latency(run, rates["intake"].per_s / 2, "half the intake capacity"),
            await latency(run, drained.per_s / 2, "half the reply capacity"),
        ]
        report_zero(run, rates, drained, lived, latencies)
        checks = [drained.verdict, lived.verdict, *(item.verdict for item in latencies)]
        if args.workers:
            scaled = [await scale_out(run, int(n)) for n in args.workers.split(",")]
            report_scale_out(scaled)
            checks += [item.verdict for item in scaled]
        return 0 if all(v.clean for v in checks) else 1
    finally:
        run.databases.drop_all()
        print(share.line())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", help="postgresql+asyncpg://…/name; default SQLite")
    parser.add_argument("--seconds", type=int, default=10, help="wrk runs; closed-loop window")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--messages", type=int, default=3000, help="drain and live phases")
    parser.add_argument("--latency-seconds", type=float, default=2.0, help="paced posting time")
    parser.add_argument("--paced-connections", type=int, default=128)
    parser.add_argument("--drain-timeout", type=float, default=180.0, help="wait for replies")
    parser.add_argument("--model-latency", type=float, default=0.0, help="seconds; >0: vs peer")
    parser.add_argument("--senders", type=int, default=128, help="closed loops (with a model)")
    parser.add_argument("--closed-drain", type=float, default=20.0, help="after the window")
    parser.add_argument(
        "--workers", help="PostgreSQL: also serve + N `parley worker`s, e.g. 1,2,4 (a queue each)"
    )
    parser.add_argument("--only-workers", action="store_true", help="only the --workers phase")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run each Parley process under taskset on a CPU of its own (round robin, last first)",
    )
    parser.add_argument(
        "--only-latency", metavar="RATES", help="only latency at these msg/s: 60,30"
    )
    parser.add_argument(
        "--only-drain", action="store_true", help="only the drain phase: CPU per reply, quickly"
    )
    args = parser.parse_args()
    if args.only_workers and not args.workers:
        parser.error("--only-workers needs --workers")
    if args.workers and not args.database_url:
        parser.error("--workers needs --database-url (PostgreSQL)")
    if not Path("/usr/bin/wrk").exists() and not any(
        (Path(p) / "wrk").exists() for p in os.environ.get("PATH", "").split(":")
    ):
        raise SystemExit("wrk is needed: apt-get install wrk")
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
