"""Several texters at once, answered by several claimers: every message answered exactly once,
replies in each conversation in the order its messages arrived, and never two model calls for
one conversation at the same time.

* Two `parley worker` processes and a `parley serve` (EMBEDDED_WORKER=false) on one PostgreSQL,
  200 messages from 40 senders (PostgreSQL only: on SQLite one claimer per file is documented).
* The in-process app, on each backend: 60 messages from 20 senders at once are answered with
  model calls running side by side, not one after another.
* A worker paused past its lease (SIGSTOP) resumes after the other worker answered: its own
  answer is dropped, not sent as a second reply.

How "one conversation, one worker at a time" is observed, from outside Parley:

1. The fake model records every call it answers. `openai_reply` runs in the fake's server
   thread *after* `openai_delay` has been slept, so a call was certainly in flight during
   [reply time - delay, reply time]; two calls for one sender whose windows overlap were in
   flight together. (A window can only miss the few milliseconds of request parsing before the
   sleep, never a sleep: two calls in flight together overlap by far more.)
2. A call's *new* messages are the user turns after the prompt's last assistant turn. A second
   worker handling a conversation while the first still does would put the first one's message,
   still unanswered, among its own new ones: a message asked twice.
3. Each worker logs every job it ran with its duration (`reply job conversation=N ...
   duration_ms=D`): per conversation, the jobs of both processes must not overlap in time, and
   both processes must have run some (or the test proved nothing about two workers). The line
   is written just *after* the job's lease is given up, and the next claim may come in between,
   so windows may touch by a few milliseconds (seen: 3 and 11 ms); an overlap longer than
   `LOG_SLACK_S` is two workers at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.models import Conversation, Message
from tests.conftest import (
    PUBLIC_BASE_URL,
    TWILIO_SID,
    TWILIO_TOKEN,
    SettingsFactory,
    running_app,
)
from tests.fakes import FakeProviders, default_openai_reply
from tests.helpers import calls as call_records
from tests.helpers import eventually, jobs, post_twilio, settled, twilio_form
from tests.processes import free_port, parley_env, provider_variables, start, stop, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
BODY = re.compile(r"^sender-(\d+) message (\d+)$")
LOG_SLACK_S = 0.1  # half the model delay of the test that uses it: a real overlap is longer
JOB_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*reply job conversation=(\d+) .*"
    r"duration_ms=(\d+)"
)


def number(sender: int) -> str:
    return f"+1555010{sender:04d}"


def body(sender: int, index: int) -> str:
    return f"sender-{sender:02d} message {index}"


def number_of(text: str) -> str:
    match = BODY.match(text)
    assert match, f"not one of this test's messages: {text!r}"
    return number(int(match.group(1)))


# ------------------------------------------------------------------ the model's record


@dataclass(frozen=True)
class Call:
    sender: str
    started: float  # time.monotonic(): `delay` before the answer, the sleep certainly running
    ended: float
    new: tuple[str, ...]


class ModelRecorder:
    """`providers.openai_reply`: records each call it answers, then echoes like the default."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def __call__(self, request_json: dict[str, Any]) -> str:
        ended = time.monotonic()
        new: list[str] = []
        for message in reversed(request_json["messages"]):
            if message["role"] != "user":
                break
            new.append(message["content"])
        new.reverse()
        call = Call(number_of(new[-1]), ended - self.delay_s, ended, tuple(new))
        with self._lock:
            self.calls.append(call)
        return default_openai_reply(request_json)

    def overlapping(self) -> list[tuple[Call, Call]]:
        """Pairs of calls for one sender that were in flight at the same time."""
        by_sender: dict[str, list[Call]] = defaultdict(list)
        for call in self.calls:
            by_sender[call.sender].append(call)
        pairs = []
        for calls in by_sender.values():
            calls.sort(key=lambda c: c.started)
            pairs += [(a, b) for a, b in itertools.pairwise(calls) if b.started < a.ended]
        return pairs

    def retaken(self) -> list[Call]:
        """Calls asked again with newer messages (SPEC §12): the sender's next call asks the
        same texts first, then the newer ones."""
        by_sender: dict[str, list[Call]] = defaultdict(list)
        for call in sorted(self.calls, key=lambda c: c.started):
            by_sender[call.sender].append(call)
        return [
            a
            for calls in by_sender.values()
            for a, b in itertools.pairwise(calls)
            if b.new[: len(a.new)] == a.new
        ]

    def asked_twice(self) -> list[str]:
        """Texts asked in two calls, a call asked again with newer messages aside."""
        retaken = set(map(id, self.retaken()))
        kept = [call for call in self.calls if id(call) not in retaken]
        counts = Counter(text for call in kept for text in call.new)
        return sorted(text for text, n in counts.items() if n > 1)


# ------------------------------------------------------------------ what was stored and sent


async def assert_each_answered_once_in_order(
    engine: AsyncEngine, providers: FakeProviders, model: ModelRecorder, expected: int
) -> None:
    """Every message answered by exactly one SMS; each conversation's replies went out in the
    order its messages arrived; each reply echoes the newest message it answers."""
    async with engine.connect() as connection:
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
    users = [r for r in rows if r.sender == "user"]
    replies = [r for r in rows if r.sender == "assistant"]
    sent = providers.twilio_sent
    assert len(users) == expected
    assert Counter(r.status for r in users) == {"answered": expected}
    assert {j.status for j in await jobs(engine)} == {"done"}

    # No SMS twice, and every SMS is a stored reply (and the other way round).
    assert not [k for k, n in Counter((s["To"], s["Body"]) for s in sent).items() if n > 1]
    assert sorted(s["sid"] for s in sent) == sorted(r.provider_message_id for r in replies)
    assert model.asked_twice() == []
    statuses = Counter(c.status for c in await call_records(engine))
    assert statuses["superseded"] == len(model.retaken())  # each dropped answer was asked again
    assert len(model.calls) == len(providers.openai_requests) == sum(statuses.values())
    assert statuses["ok"] == len(replies)

    seq = {s["sid"]: s["seq"] for s in sent}
    text_of = {r.id: r.body for r in rows}
    for remote in {r.remote_address for r in users}:
        mine = [r.id for r in users if r.remote_address == remote]
        answers = sorted(
            (r for r in replies if r.remote_address == remote),
            key=lambda r: seq[r.provider_message_id],
        )
        answered = [r.reply_to_id for r in answers]
        # Strictly increasing in the order Twilio accepted them: in order, none answered twice;
        # ending at the newest message: every one of them answered.
        assert answered == sorted(set(answered)), (remote, answered)
        assert answered[-1] == mine[-1], (remote, answered, mine)
        for reply in answers:
            assert reply.body == f"echo: {text_of[reply.reply_to_id]}"
            assert number_of(text_of[reply.reply_to_id]) == remote


# ------------------------------------------------------------------ real processes


def job_windows(log: str) -> list[tuple[int, float, float]]:
    """(conversation, start, end) of every job a worker logged, in seconds since the epoch."""
    windows = []
    for line in log.splitlines():
        if match := JOB_LINE.match(line):
            ended = dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            windows.append((int(match.group(2)), ended - int(match.group(3)) / 1000, ended))
    return windows


@pytest.fixture
async def parley_processes(
    database_url: str, providers: FakeProviders, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    """`await launch(workers=2, **ENV)` -> (port, {name: log path}): a `parley serve` without
    its worker plus `workers` x `parley worker`, all ready; stopped with SIGTERM afterwards."""
    processes: list[subprocess.Popen[bytes]] = []

    async def launch(workers: int = 2, **overrides: str) -> tuple[int, dict[str, Path]]:
        env = parley_env(
            PYTHONPATH=str(ROOT),
            DATABASE_URL=database_url,
            AUTO_MIGRATE="false",  # the test database is a copy of a migrated template
            PUBLIC_BASE_URL=PUBLIC_BASE_URL,
            **provider_variables(
                providers.base_url,
                account_sid=TWILIO_SID,
                auth_token=TWILIO_TOKEN,
                openai_key="test-key",
                model="gpt-test",
            ),
            EMBEDDED_WORKER="false",
            LOG_LEVEL="INFO",
            **overrides,
        )
        port = free_port()
        logs = {"serve": tmp_path / "serve.log"}
        processes.append(start(["serve", "--port", str(port)], env, tmp_path, logs["serve"]))
        for n in range(1, workers + 1):
            logs[f"worker-{n}"] = tmp_path / f"worker-{n}.log"
            processes.append(start(["worker"], env, tmp_path, logs[f"worker-{n}"]))
        await asyncio.to_thread(wait_healthy, port, processes[0])

        async def workers_started() -> bool:
            for process in processes[1:]:
                assert process.poll() is None, "a parley worker exited at start"
            return all(
                re.search(r"reply worker \S+ started", path.read_text(errors="replace"))
                for name, path in logs.items()
                if name != "serve"
            )

        await eventually(workers_started, timeout=30, interval=0.05)
        return port, logs

    try:
        yield launch
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            await asyncio.to_thread(stop, process)


async def text_in_rounds(url: str, senders: int, per_sender: int) -> None:
    """Everyone's first message at once, then (once all were acknowledged) everyone's second...:
    a sender's messages arrive in the order they were written, senders race each other."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for index in range(per_sender):
            responses = await asyncio.gather(
                *(
                    post_twilio(client, twilio_form(Body=body(s, index), From=number(s)))
                    for s in range(senders)
                )
            )
            assert [r.status_code for r in responses] == [200] * senders


async def test_two_workers_on_one_postgresql_answer_200_messages_from_40_senders_once_each(
    parley_processes: Callable[..., Any],
    database_url: str,
    engine: AsyncEngine,
    providers: FakeProviders,
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("several claimers on one database: PostgreSQL only (SQLite: one per file)")
    senders, per_sender = 40, 5
    model = ModelRecorder(delay_s=0.2)
    providers.openai_delay = model.delay_s
    providers.openai_reply = model
    port, logs = await parley_processes(
        workers=2,
        # More slots (2 x 32) than conversations: a conversation with a new message while its
        # reply runs is never kept waiting for capacity, so a claim that ignored the running
        # job would hand it to the other worker at once (checked: the test then fails).
        WORKER_CONCURRENCY="32",
        REPLY_LEASE_S="10",  # nobody dies or stalls here (the next test is about stalls)
        WORKER_POLL_S="0.2",
        REPLY_RETRY_BASE_S="0.1",
    )

    await text_in_rounds(f"http://127.0.0.1:{port}", senders, per_sender)
    await eventually(lambda: settled(engine), timeout=30, interval=0.1)
    await asyncio.sleep(0.5)  # a doubled reply would be sent now

    await assert_each_answered_once_in_order(engine, providers, model, senders * per_sender)
    assert model.overlapping() == []
    assert providers.openai_max_concurrency > 1  # calls did run side by side, across senders
    windows = {name: job_windows(path.read_text()) for name, path in logs.items()}
    assert windows["serve"] == []  # EMBEDDED_WORKER=false: the web process claims nothing
    assert windows["worker-1"] and windows["worker-2"], "both workers must have run jobs"
    by_conversation: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for conversation, begun, ended in windows["worker-1"] + windows["worker-2"]:
        by_conversation[conversation].append((begun, ended))
    assert len(by_conversation) == senders
    for conversation, spans in by_conversation.items():
        spans.sort()
        together = [(a, b) for a, b in itertools.pairwise(spans) if b[0] < a[1] - LOG_SLACK_S]
        assert not together, f"conversation {conversation} handled twice at once: {together}"


async def test_a_worker_paused_past_its_lease_does_not_send_a_second_reply(
    parley_processes: Callable[..., Any],
    database_url: str,
    engine: AsyncEngine,
    providers: FakeProviders,
) -> None:
    """A paused process (SIGSTOP here; a frozen container, a VM migration, a stalled host in
    life) is not a dead one: when it resumes, the work it lost must stay lost."""
    if not database_url.startswith("postgresql"):
        pytest.skip("several claimers on one database: PostgreSQL only (SQLite: one per file)")
    providers.openai_delay = 3.0
    port, _ = await parley_processes(workers=2, REPLY_LEASE_S="1", WORKER_POLL_S="0.1")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        response = await post_twilio(client, twilio_form(Body="Hello there"))
    assert response.status_code == 200
    await providers.wait_for_async(lambda: providers.openai_in_flight == 1, timeout=10)
    [job] = await jobs(engine)
    paused = int(job.lease_owner.split(":")[1])  # worker_id(): host:pid:random
    os.kill(paused, signal.SIGSTOP)
    try:  # its lease runs out; the other worker asks the model again and sends the reply
        await providers.wait_for_async(lambda: len(providers.openai_requests) == 2, timeout=15)
        await providers.wait_for_async(lambda: providers.twilio_sent, timeout=15)
    finally:
        os.kill(paused, signal.SIGCONT)
    await asyncio.sleep(2.0)  # the resumed worker has its model answer in its socket by now

    assert [s["Body"] for s in providers.twilio_sent] == ["echo: Hello there"]


# ------------------------------------------------------------------ in-process


async def test_60_messages_from_20_senders_at_once_are_answered_once_with_concurrent_calls(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    senders, per_sender = 20, 3
    model = ModelRecorder(delay_s=0.3)
    providers.openai_delay = model.delay_s
    providers.openai_reply = model
    settings = make_settings(worker_poll_s=0.05, reply_retry_base_s=0.05)
    async with running_app(settings) as client:
        forms = [
            twilio_form(Body=body(s, i), From=number(s))
            for i in range(per_sender)
            for s in range(senders)
        ]
        responses = await asyncio.gather(*(post_twilio(client, form) for form in forms))
        assert [r.status_code for r in responses] == [200] * len(forms)
        await eventually(lambda: settled(engine), timeout=30, interval=0.05)
        await asyncio.sleep(0.3)  # a doubled reply would be sent now

    # Posted all at once, a sender's messages may arrive in any order: replies follow arrival.
    await assert_each_answered_once_in_order(engine, providers, model, senders * per_sender)
    assert model.overlapping() == []
    assert providers.openai_max_concurrency > 1  # not one model call after another
