"""A burst of texts against real Parley processes and a slow fake model: is every message
answered exactly once, in order, and how long until the last reply?

    python bench/burst.py [--database sqlite|postgresql] [--messages 500] [--senders 100]
                          [--concurrency 50] [--model-delay 1.0] [--workers 2]
                          [--worker-concurrency 32] [--timeline]

The providers are tests/fakes.py's loopback fakes, in this process: Twilio, and an
OpenAI-compatible model that sleeps `--model-delay` seconds per call and echoes the newest user
message. Parley runs as an operator would run it: on SQLite one `parley serve` with its
embedded worker; on PostgreSQL one `parley serve` with EMBEDDED_WORKER=false plus `--workers`
`parley worker` processes, on a fresh database created on BENCH_PG's server and dropped at the
end (default postgresql://postgres@127.0.0.1:5432/postgres).

`--senders` people each text `messages / senders` times, interleaved (everyone's first message,
then everyone's second...), posted as correctly signed Twilio webhooks by `--concurrency`
concurrent httpx clients. The run ends when every message was put to the model in a call whose
reply Twilio accepted; then Parley is stopped and the database and the fake's records are
checked: every message answered, no reply sent twice, replies in the order Parley received the
messages, every send recorded. (Parley can only know the order in which webhooks *arrive*; two
webhooks of one sender racing each other may arrive swapped, and that is counted separately.)

The database is not polled during the run: on SQLite every transaction is BEGIN IMMEDIATE, so a
poller would compete with Parley for the write lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import pwd
import re
import resource
import secrets
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/burst.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(ROOT))

from service.db import create_engine  # noqa: E402
from service.models import AssistantCall, Conversation, Message, ReplyJob  # noqa: E402
from service.testing import inbound_form, sign  # noqa: E402
from tests.fakes import FakeProviders, default_openai_reply  # noqa: E402
from tests.processes import free_port, parley_env, provider_variables, wait_healthy  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
ACCOUNT = "AC32d0d85518aa25edef571b53f079c2be"
PUBLIC = "https://parley.example.com"
PARLEY_NUMBER = "+15559990000"
BODY = re.compile(r"^sender-(\d+) message (\d+)$")


def sender_number(sender: int) -> str:
    return f"+1555{sender:07d}"


def body_of(sender: int, index: int) -> str:
    return f"sender-{sender:03d} message {index}"


def number_of_body(body: str) -> str | None:
    match = BODY.match(body)
    return sender_number(int(match.group(1))) if match else None


# ------------------------------------------------------------------ the fake model's record


@dataclass
class ModelCall:
    started: float
    ended: float
    new: list[str]  # the user messages it answers: those after the prompt's last assistant turn


@dataclass
class ModelLog:
    """What the fake model was asked, appended to from the fake's server thread."""

    delay_s: float
    calls: list[ModelCall] = field(default_factory=list)

    def reply(self, request_json: dict[str, Any]) -> str:
        # The fake calls this after its `openai_delay` sleep: the call began `delay_s` ago.
        now = time.time()
        new: list[str] = []
        for message in reversed(request_json.get("messages", [])):
            if message.get("role") != "user":
                break
            new.append(str(message.get("content")))
        new.reverse()
        self.calls.append(ModelCall(now - self.delay_s, now, new))  # list.append is atomic
        return default_openai_reply(request_json)


# ------------------------------------------------------------------ processes and the machine


def rss_kib(pid: int) -> int:
    """VmRSS of a live process, from /proc (psutil is not a dependency)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def postgres_cpu_s() -> float:
    """CPU seconds of the local PostgreSQL server's processes, children already reaped
    included (a backend's time moves to the postmaster's cutime when its session ends)."""
    try:
        uid = pwd.getpwnam("postgres").pw_uid
    except KeyError:
        return 0.0
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if proc.stat().st_uid != uid:
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Parley:
    """The Parley processes of one run, as an operator would start them."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "service", *args],
            env=self.env,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def start(self, workers: int) -> None:
        """`parley serve`, then `workers` x `parley worker`; returns once all can work."""
        serve = self._start("serve", ["serve", "--port", str(self.port)])
        for number in range(workers):
            self._start(f"worker-{number + 1}", ["worker"])
        wait_healthy(self.port, serve, timeout=60)
        deadline = time.monotonic() + 60
        claimers = [n for n in self.processes if n.startswith("worker")] or ["serve"]
        for name in claimers:
            while not re.search(r"reply worker \S+ started", self.log(name)):
                if self.processes[name].poll() is not None:
                    raise SystemExit(f"{name} exited at start:\n{self.log(name)}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name} did not start its worker:\n{self.log(name)}")
                time.sleep(0.05)

    def rss(self) -> dict[str, int]:
        return {name: rss_kib(p.pid) for name, p in self.processes.items() if p.poll() is None}

    def cpu(self) -> dict[str, float]:
        return {name: cpu_s(p.pid) for name, p in self.processes.items() if p.poll() is None}

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to all, then their exit codes."""
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        codes: dict[str, int | None] = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = process.wait()
        return codes


def pg_admin_url() -> str:
    return os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def fresh_database(kind: str, workdir: Path) -> str:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{workdir / 'parley.db'}"
    name = f"parley_burst_{secrets.token_hex(4)}"
    subprocess.run(["psql", pg_admin_url(), "-qc", f'CREATE DATABASE "{name}"'], check=True)
    url = make_url(pg_admin_url()).set(drivername="postgresql+asyncpg", database=name)
    return url.render_as_string(hide_password=False)


def pg_stats(database_url: str) -> tuple[int, int] | None:
    """(sessions, transactions) PostgreSQL has counted on this database, or None."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return None
    query = (
        "SELECT sessions, xact_commit + xact_rollback FROM pg_stat_database "
        f"WHERE datname = '{url.database}'"
    )
    result = subprocess.run(
        ["psql", pg_admin_url(), "-AtF", " ", "-c", query],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        sessions, transactions = map(int, result.stdout.split())
    except ValueError:
        return None
    return sessions, transactions


def drop_database(database_url: str) -> None:
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return
    subprocess.run(
        ["psql", pg_admin_url(), "-qc", f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'],
        check=False,
    )


# ------------------------------------------------------------------ the burst


def webhooks(messages: int, senders: int) -> list[tuple[str, dict[str, str]]]:
    """(signature, form) for each message, interleaved: everyone's first, then second..."""
    per_sender = math.ceil(messages / senders)
    url = PUBLIC + "/webhooks/twilio/sms"
    out: list[tuple[str, dict[str, str]]] = []
    for index, sender in itertools.product(range(per_sender), range(senders)):
        if len(out) == messages:
            break
        sid = "SM" + secrets.token_hex(16)
        form = inbound_form(
            body_of(sender, index), sender_number(sender), PARLEY_NUMBER, sid, ACCOUNT
        )
        out.append((sign(TOKEN, url, form), form))
    return out


@dataclass
class Posted:
    started: float  # epoch of the first post
    latencies: list[float]
    statuses: Counter[int]
    acked: list[float]  # epoch of each answer


async def post_all(port: int, requests: list[tuple[str, dict[str, str]]], clients: int) -> Posted:
    """Post every webhook, in order, from `clients` concurrent httpx clients.

    One client each, not one client with `clients` connections: httpcore's pool costs CPU
    quadratic in its connections (about 8 ms of CPU a request at 50 on a 2-core machine, more
    than Parley spends), which would measure the benchmark instead of Parley. They share one
    SSL context, which httpx would otherwise build per client (tens of ms of CPU each)."""
    queue = list(reversed(requests))
    posted = Posted(0.0, [], Counter(), [])
    tls = ssl.create_default_context()

    async def client() -> None:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=60, verify=tls
        ) as http:
            while queue:
                signature, form = queue.pop()
                headers = {
                    "Content-Type": "application/x-www-form-urlencoded",
                    "X-Twilio-Signature": signature,
                    "User-Agent": "TwilioProxy/1.1",
                }
                began = time.perf_counter()
                try:
                    response = await http.post(
                        "/webhooks/twilio/sms", content=urlencode(form), headers=headers
                    )
                    posted.statuses[response.status_code] += 1
                except httpx.HTTPError:
                    posted.statuses[0] += 1
                posted.latencies.append(time.perf_counter() - began)
                posted.acked.append(time.time())

    posted.started = time.time()
    await asyncio.gather(*(client() for _ in range(clients)))
    return posted


def covered(model: ModelLog, sent: list[dict[str, Any]]) -> set[str]:
    """Messages put to the model in a call whose reply (the echo of its newest message)
    Twilio accepted."""
    accepted = {(s["To"], s["Body"]) for s in sent}
    done: set[str] = set()
    for call in list(model.calls):
        if call.new and (number_of_body(call.new[-1]), f"echo: {call.new[-1]}") in accepted:
            done.update(call.new)
    return done


async def wait_answered(
    fake: FakeProviders, model: ModelLog, bodies: set[str], within_s: float
) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if bodies <= covered(model, fake.twilio_sent):
            return True
        await asyncio.sleep(0.05)
    return False


# ------------------------------------------------------------------ checks


@dataclass
class Verdict:
    """What the database and the fake Twilio say about the run."""

    counts: dict[str, dict[str, int]]
    unanswered: int = 0  # user messages not `answered`
    sent_twice: int = 0  # conversations sent one reply text twice, or two replies to one message
    out_of_order: int = 0  # conversations whose replies went out in another order than stored
    last_unanswered: int = 0  # conversations whose newest message no reply answers
    wrong_echo: int = 0  # replies that do not echo the message they claim to answer
    unrecorded_sends: int = 0  # SMS Twilio accepted that no stored reply claims
    arrived_swapped: int = 0  # conversations whose webhooks arrived out of the sender's order

    @property
    def clean(self) -> bool:
        return not (
            self.unanswered
            or self.sent_twice
            or self.out_of_order
            or self.last_unanswered
            or self.wrong_echo
            or self.unrecorded_sends
        )


async def verify(database_url: str, sent: list[dict[str, Any]]) -> Verdict:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:

            async def grouped(column: Any, *where: Any) -> dict[str, int]:
                rows = await connection.execute(
                    select(column, func.count()).where(*where).group_by(column)
                )
                return {str(k): int(v) for k, v in rows}

            counts = {
                "user messages": await grouped(Message.status, Message.sender == "user"),
                "replies": await grouped(Message.status, Message.sender == "assistant"),
                "reply jobs": await grouped(ReplyJob.status),
                "job attempts": await grouped(ReplyJob.attempts),
                "model calls": await grouped(AssistantCall.status),
            }
            rows = list(
                await connection.execute(
                    select(
                        Message.id,
                        Conversation.remote_address,
                        Message.sender,
                        Message.body,
                        Message.status,
                        Message.reply_to_id,
                        Message.provider_message_id,
                    )
                    .join(Conversation, Conversation.id == Message.conversation_id)
                    .order_by(Message.id)
                )
            )
    finally:
        await engine.dispose()

    verdict = Verdict(counts)
    seq_of = {s["sid"]: s["seq"] for s in sent}
    body_of_id = {r.id: r.body for r in rows}
    users: dict[str, list[Any]] = defaultdict(list)
    replies: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        (users if row.sender == "user" else replies)[row.remote_address].append(row)
    verdict.unanswered = sum(r.status != "answered" for rs in users.values() for r in rs)
    verdict.unrecorded_sends = len(set(seq_of) - {r.provider_message_id for r in rows})
    verdict.wrong_echo = sum(
        r.body != f"echo: {body_of_id.get(r.reply_to_id)}" for rs in replies.values() for r in rs
    )
    texts = Counter((s["To"], s["Body"]) for s in sent)
    twice_to = {to for (to, _), n in texts.items() if n > 1}
    for number, messages in users.items():
        indexes = [int(BODY.match(m.body).group(2)) for m in messages]  # type: ignore[union-attr]
        verdict.arrived_swapped += indexes != sorted(indexes)
        answers = [
            r.reply_to_id
            for r in sorted(replies[number], key=lambda r: seq_of.get(r.provider_message_id, 0))
        ]
        verdict.sent_twice += number in twice_to or len(set(answers)) != len(answers)
        verdict.out_of_order += answers != sorted(answers)
        verdict.last_unanswered += max(answers, default=None) != messages[-1].id
    return verdict


def model_overlap(calls: list[ModelCall]) -> tuple[int, int]:
    """(messages put to the model more than once, senders with two model calls at once)."""
    asked = Counter(text for call in calls for text in call.new)
    by_sender: dict[str | None, list[ModelCall]] = defaultdict(list)
    for call in calls:
        if call.new:
            by_sender[number_of_body(call.new[-1])].append(call)
    overlapping = 0
    for sender_calls in by_sender.values():
        sender_calls.sort(key=lambda c: c.started)
        overlapping += any(b.started < a.ended for a, b in itertools.pairwise(sender_calls))
    return sum(n > 1 for n in asked.values()), overlapping


def stages(calls: list[ModelCall], sent: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Where a reply's time goes outside the model, as seen from the providers:
    "answer → SMS": from the model's answer to Twilio accepting the reply made of it;
    "SMS → next call": from a conversation's reply being accepted to its next model call."""
    accepted = {(s["To"], s["Body"]): s["time"] for s in sent}
    out: dict[str, list[float]] = {"answer → SMS": [], "SMS → next call": []}
    by_sender: dict[str | None, list[ModelCall]] = defaultdict(list)
    for call in calls:
        if not call.new:
            continue
        number = number_of_body(call.new[-1])
        by_sender[number].append(call)
        if (when := accepted.get((number, f"echo: {call.new[-1]}"))) is not None:
            out["answer → SMS"].append(when - call.ended)
    for number, sender_calls in by_sender.items():
        sender_calls.sort(key=lambda c: c.started)
        for before, after in itertools.pairwise(sender_calls):
            if (when := accepted.get((number, f"echo: {before.new[-1]}"))) is not None:
                out["SMS → next call"].append(after.started - when)
    return out


def timeline(
    started: float, acked: list[float], calls: list[ModelCall], sent: list[dict[str, Any]]
) -> list[str]:
    """Per second since the first post: webhooks answered, model calls started, model calls in
    flight (mean over the second), replies accepted by Twilio."""
    end = max([*acked, *(c.ended for c in calls), *(s["time"] for s in sent)], default=started)
    lines = ["   s  webhooks  calls started  calls in flight  replies sent"]
    for second in range(math.ceil(end - started)):
        lo, hi = started + second, started + second + 1

        def inside(moments: list[float], lo: float = lo, hi: float = hi) -> int:
            return sum(lo <= m < hi for m in moments)

        busy = sum(max(0.0, min(c.ended, hi) - max(c.started, lo)) for c in calls)
        lines.append(
            f"{second:>4}  {inside(acked):>8}  {inside([c.started for c in calls]):>13}"
            f"  {busy:>15.1f}  {inside([s['time'] for s in sent]):>12}"
        )
    return lines


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def ms(values: list[float]) -> str:
    return f"{percentile(values, 50) * 1000:.0f} / {percentile(values, 99) * 1000:.0f} ms"


# ------------------------------------------------------------------ main


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="parley-burst-"))
    workers = args.workers if args.database == "postgresql" else 0
    requests = webhooks(args.messages, args.senders)
    bodies = {form["Body"] for _, form in requests}
    database_url = fresh_database(args.database, workdir)
    model = ModelLog(args.model_delay)
    try:
        async with FakeProviders() as fake:
            fake.openai_delay = args.model_delay
            fake.openai_reply = model.reply
            env = parley_env(
                PYTHONPATH=str(ROOT),
                DATABASE_URL=database_url,
                PUBLIC_BASE_URL=PUBLIC,
                **provider_variables(
                    fake.base_url,
                    account_sid=ACCOUNT,
                    auth_token=TOKEN,
                    openai_key="bench-key",
                    model="gpt-bench",
                ),
                WORKER_CONCURRENCY=str(args.worker_concurrency),
                EMBEDDED_WORKER="true" if args.database == "sqlite" else "false",
                LOG_LEVEL="INFO",
            )
            if args.database == "postgresql":  # migrate once, before the processes start
                await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "service", "migrate"],
                    env=env,
                    cwd=workdir,
                    check=True,
                    capture_output=True,
                )
            parley = Parley(env, workdir)
            try:
                await asyncio.to_thread(parley.start, workers)
                await asyncio.sleep(1.0)  # let start-up settle before measuring "idle"
                idle_rss = parley.rss()
                cpu_before, own_before, pg_before = parley.cpu(), own_cpu_s(), postgres_cpu_s()
                machine_before = machine_jiffies()
                posted = await post_all(parley.port, requests, args.concurrency)
                posting_s = time.time() - posted.started
                answered = await wait_answered(fake, model, bodies, args.timeout)
                last_reply = max((s["time"] for s in fake.twilio_sent), default=math.nan)
                machine_after = machine_jiffies()
                cpu_used = {k: v - cpu_before[k] for k, v in parley.cpu().items()}
                own_used = own_cpu_s() - own_before
                pg_used = postgres_cpu_s() - pg_before
                await asyncio.sleep(args.settle)  # a reply sent twice would show up now
                after_rss = parley.rss()
            finally:
                codes = parley.stop()
            await asyncio.sleep(0.6)  # the statistics collector reports every 500 ms
            stats = await asyncio.to_thread(pg_stats, database_url)
            sent = fake.twilio_sent
            model_requests = len(fake.openai_requests)
            max_concurrency = fake.openai_max_concurrency
        verdict = await verify(database_url, sent)
    finally:
        drop_database(database_url)

    asked_twice, overlapping = model_overlap(model.calls)
    busy = machine_after[0] - machine_before[0]
    machine_busy = busy / max(machine_after[1] - machine_before[1], 1)
    slots = max(workers, 1) * args.worker_concurrency
    setup = (
        "one `parley serve` (embedded worker)"
        if args.database == "sqlite"
        else f"`parley serve` (EMBEDDED_WORKER=false) + {workers} x `parley worker`"
    )
    print(f"\n{args.database}: {setup}, WORKER_CONCURRENCY={args.worker_concurrency}")
    print(
        f"{args.messages} messages from {args.senders} senders by {args.concurrency} "
        f"concurrent clients; fake model {args.model_delay:g} s; {os.cpu_count()} CPU cores"
    )
    print(f"  all answered:                  {'yes' if answered and verdict.clean else 'NO'}")
    print(f"  webhook answers:               {dict(posted.statuses)}")
    print(f"  replies sent (Twilio):         {len(sent)}")
    print(f"  conversations sent a reply 2x: {verdict.sent_twice}")
    print(f"  conversations out of order:    {verdict.out_of_order}")
    print(f"  unanswered / last unanswered:  {verdict.unanswered} / {verdict.last_unanswered}")
    print(f"  wrong echo / unrecorded sends: {verdict.wrong_echo} / {verdict.unrecorded_sends}")
    print(f"  messages asked twice (model):  {asked_twice}")
    print(f"  senders with 2 calls at once:  {overlapping}")
    print(f"  webhooks arrived swapped:      {verdict.arrived_swapped} conversations")
    print(f"  posting took:                  {posting_s:.2f} s")
    print(f"  first post → last reply:       {last_reply - posted.started:.2f} s")
    rounds = math.ceil(model_requests / slots)
    print(
        f"  model-bound ideal:             ~{rounds * args.model_delay:.0f} s after the last "
        f"webhook ({model_requests} calls over {slots} slots)"
    )
    print(f"  webhook latency p50 / p99:     {ms(posted.latencies)}")
    for stage, values in stages(model.calls, sent).items():
        print(f"  {stage + ' p50 / p99:':<31}{ms(values)}")
    print(f"  model calls made:              {model_requests}")
    print(f"  max concurrent model calls:    {max_concurrency}")
    for name in idle_rss:
        print(
            f"  RSS {name:<10} idle / after:   {idle_rss[name] / 1024:.1f} / "
            f"{after_rss.get(name, 0) / 1024:.1f} MiB"
        )
    for name, seconds in cpu_used.items():
        print(f"  CPU {name:<10} in the run:     {seconds:.1f} s")
    print(f"  CPU this bench (fakes, client): {own_used:.1f} s")
    wall = (machine_after[1] - machine_before[1]) / os.sysconf("SC_CLK_TCK")  # cores x seconds
    others = busy / os.sysconf("SC_CLK_TCK") - sum(cpu_used.values()) - own_used - pg_used
    print(f"  CPU PostgreSQL server:         {pg_used:.1f} s")
    print(f"  machine CPU busy in the run:   {machine_busy:.0%} of {wall:.1f} core-seconds")
    print(f"  CPU anything else:             {others:.1f} s (other work on this machine)")
    if stats is not None:
        print(
            f"  PostgreSQL sessions / txns:    {stats[0]} / {stats[1]} "
            "(all processes, from migration to stop)"
        )
    if args.timeline:
        print(
            "\n".join(
                "  " + line for line in timeline(posted.started, posted.acked, model.calls, sent)
            )
        )
    print(f"  exit codes after SIGTERM:      {codes}")
    print(f"  database:                      {verdict.counts}")
    print(f"  logs:                          {workdir}")
    clean = answered and verdict.clean and not (asked_twice or overlapping)
    return 0 if clean else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--senders", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=50, help="httpx clients posting at once")
    parser.add_argument("--model-delay", type=float, default=1.0, help="seconds per model call")
    parser.add_argument("--workers", type=int, default=2, help="`parley worker`s (PostgreSQL)")
    parser.add_argument("--worker-concurrency", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=600, help="give up waiting after this")
    parser.add_argument("--settle", type=float, default=2.0, help="then watch for doubles")
    parser.add_argument("--timeline", action="store_true", help="print what happened each second")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
