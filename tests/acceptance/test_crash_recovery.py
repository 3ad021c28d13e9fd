"""Real `parley serve` processes, killed (-9) or stopped (SIGTERM) at the worst moments and
started again on the same database: every acknowledged message is answered exactly once.

Each test runs the server as a subprocess on a free loopback port, against a fresh database (a
SQLite file, and PostgreSQL when TEST_DATABASE_URL is set), talking to the fake providers of
tests/fakes.py over loopback. Nothing here waits a fixed time: every wait polls with a bound.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.models import Message
from tests.conftest import PUBLIC_BASE_URL, TWILIO_SID, TWILIO_TOKEN
from tests.fakes import FakeProviders
from tests.helpers import calls, eventually, jobs, messages, post_twilio, settled, twilio_form
from tests.processes import provider_variables

ROOT = Path(__file__).resolve().parents[2]
LEASE_S = 1.0  # REPLY_LEASE_S: how long a killed process's job stays claimed
START_TIMEOUT_S = 30.0
# SHUTDOWN_GRACE_S: how long running replies may finish on SIGTERM; the process must end
# within it plus a margin for uvicorn's own shutdown.
SHUTDOWN_GRACE_S = 2.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One `python -m service serve` process."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.port = _free_port()
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(self.port)],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def ready(self) -> Server:
        deadline = time.monotonic() + START_TIMEOUT_S
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"parley serve exited at start:\n{self.log}")
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"parley serve not ready in {START_TIMEOUT_S}s:\n{self.log}")

    async def text(self, body: str, **fields: str) -> None:
        """Text the server as Twilio would; asserts the webhook's 200."""
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            response = await post_twilio(client, twilio_form(Body=body, **fields))
        assert response.status_code == 200, response.text

    async def whatsapp(self, body: str) -> None:
        """Message the server as WhatsApp through Twilio would; asserts the webhook's 200."""
        form = twilio_form("twilio/whatsapp_text.json", Body=body)
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            response = await post_twilio(client, form, path="/webhooks/twilio/whatsapp")
        assert response.status_code == 200, response.text

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        self.process.kill()
        self.process.wait(timeout=10)

    async def terminate(self, timeout: float) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds until exit); fails if it outlives `timeout`."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        while self.process.poll() is None:
            if time.monotonic() - started > timeout:
                self.kill()
                raise AssertionError(f"still running {timeout}s after SIGTERM:\n{self.log}")
            await asyncio.sleep(0.02)
        return self.process.returncode, time.monotonic() - started

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self._log.close()


@pytest.fixture
async def start(
    database_url: str, providers: FakeProviders, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    """`await start(**ENV)`: a ready server on the test's database, wired to the fakes."""
    servers: list[Server] = []
    base = {
        k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    }
    env = {
        **base,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url,
        "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
        **provider_variables(
            providers.base_url,
            account_sid=TWILIO_SID,
            auth_token=TWILIO_TOKEN,
            openai_key="test-key",
            model="gpt-test",
        ),
        "ASSISTANT_TIMEOUT_S": "120",  # the fake model is slow on purpose
        "PROVIDER_TIMEOUT_S": "60",  # Twilio hangs on purpose; the process dies first
        "REPLY_RETRY_BASE_S": "0.1",
        "REPLY_LEASE_S": str(LEASE_S),
        "WORKER_POLL_S": "0.1",
        "REPLY_DEBOUNCE_S": "0",  # the burst tests turn SPEC §12's quiet time on
        "SHUTDOWN_GRACE_S": str(SHUTDOWN_GRACE_S),
        "LOG_LEVEL": "INFO",
    }

    async def launch(**overrides: str) -> Server:
        server = Server({**env, **overrides}, tmp_path / f"serve-{len(servers)}.log", tmp_path)
        servers.append(server)
        return await server.ready()

    try:
        yield launch
    finally:
        for server in servers:
            server.close()


async def done(engine: AsyncEngine, timeout: float = 20.0) -> None:
    await eventually(lambda: settled(engine), timeout=timeout)


def bodies_sent(providers: FakeProviders) -> list[str]:
    return [s["Body"] for s in providers.twilio_sent]


async def assert_answered_once(engine: AsyncEngine, providers: FakeProviders, body: str) -> None:
    """What the texter and the operator see after recovery: one SMS, one stored reply."""
    assert bodies_sent(providers) == [f"echo: {body}"]
    [sent] = providers.twilio_sent
    [question] = await messages(engine, Message.sender == "user")
    assert (question.body, question.status) == (body, "answered")
    [reply] = await messages(engine, Message.sender == "assistant")
    assert reply.provider_message_id == sent["sid"] and reply.reply_to_id == question.id
    [job] = await jobs(engine)
    assert job.status == "done"


# ------------------------------------------------------------------ kill -9


async def test_kill_9_right_after_the_200_then_restart_answers_once(
    start: Callable[..., Any], engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_delay = 2.0  # no reply can be made before the kill
    first = await start()
    await first.text("Hello there")
    first.kill()

    [stored] = await messages(engine)  # acknowledged, therefore durable
    assert (stored.body, stored.status) == ("Hello there", "received")
    assert providers.twilio_sent == []
    providers.openai_delay = 0.0
    await start()
    await done(engine)
    await assert_answered_once(engine, providers, "Hello there")


async def test_kill_9_during_the_model_call_then_restart_answers_once(
    start: Callable[..., Any], engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_delay = 30.0
    first = await start()
    await first.text("Hello there")
    await providers.wait_for_async(lambda: providers.openai_requests, timeout=10)
    first.kill()

    [job] = await jobs(engine)
    assert job.status == "running"  # claimed by the dead process: its lease must run out
    providers.openai_delay = 0.0
    await start()
    await done(engine)
    await assert_answered_once(engine, providers, "Hello there")
    assert len(providers.openai_requests) == 2  # the lost call, then one more


async def test_kill_9_while_the_send_is_in_flight_then_restart_sends_once(
    start: Callable[..., Any], engine: AsyncEngine, providers: FakeProviders
) -> None:
    """The model answered; the send went out but never reached Twilio; the process died."""
    providers.twilio_plan(("hang", 60))
    first = await start()
    await first.text("Hello there")
    await providers.wait_for_async(lambda: providers.twilio_attempts, timeout=10)
    first.kill()

    [reply] = await messages(engine, Message.sender == "assistant")
    assert reply.status == "sending"  # stored before the send: the model is not asked again
    await start()
    await done(engine)
    await assert_answered_once(engine, providers, "Hello there")
    assert providers.twilio_attempts == ["hang", "ok"]
    assert len(providers.openai_requests) == 1


async def test_kill_9_after_twilio_accepted_then_restart_sends_no_second_sms(
    start: Callable[..., Any], engine: AsyncEngine, providers: FakeProviders
) -> None:
    """Twilio accepted the SMS but the process died before it heard so."""
    providers.twilio_plan(("accept_then_hang", 60))
    first = await start()
    await first.text("Hello there")
    await providers.wait_for_async(lambda: providers.twilio_sent, timeout=10)
    first.kill()

    await start()
    await done(engine)
    await assert_answered_once(engine, providers, "Hello there")
    assert providers.twilio_attempts == ["accept_then_hang"]
    assert len(providers.openai_requests) == 1


async def test_kill_9_during_the_debounce_wait_then_restart_answers_the_burst_once(
    start: Callable[..., Any], engine: AsyncEngine, providers: FakeProviders
) -> None:
    """The burst was acknowledged and waits for quiet (SPEC §12); the process died meanwhile."""
    first = await start(REPLY_DEBOUNCE_S="1.0")
    await first.text("is the shop open")
    await first.text("on Sunday?")
    first.kill()

    waiting = await jobs(engine)
    assert [j.status for j in waiting] == ["queued", "queued"]  # durable: the wait is a row
    assert waiting[0].run_after == waiting[1].run_after > waiting[1].created_at
    assert providers.openai_requests == []
    await start(REPLY_DEBOUNCE_S="1.0")
    await done(engine)
    [request] = providers.openai_requests
    assert [m["content"] for m in request["messages"] if m["role"] == "user"] == [
        "is the shop open",
        "on Sunday?",
    ]
    assert bodies_sent(providers) == ["echo: on Sunday?"]


async def test_kill_9_between_a_retaken_answer_and_its_send_sends_it_once(
    start: Callable[..., Any], engine: AsyncEngine, providers: FakeProviders
) -> None:
    """A text arrived during the model call, so the model was asked again; Twilio accepted that
    answer but the process died before it heard so. The dropped answer is never sent."""
    providers.openai_delay = 0.5
    providers.twilio_plan(("accept_then_hang", 60))
    first = await start(REPLY_DEBOUNCE_S="0.2")
    await first.text("is the shop open")
    await providers.wait_for_async(lambda: providers.openai_requests, timeout=10)
    await first.text("on Sunday?")
    await providers.wait_for_async(lambda: providers.twilio_sent, timeout=10)
    first.kill()

    [reply] = await messages(engine, Message.sender == "assistant")
    assert (reply.status, reply.body) == ("sending", "echo: on Sunday?")
    providers.openai_delay = 0.0
    await start(REPLY_DEBOUNCE_S="0.2")
    await done(engine)
    assert bodies_sent(providers) == ["echo: on Sunday?"]
    assert providers.twilio_attempts == ["accept_then_hang"]  # found by the lookup, not resent
    assert len(providers.openai_requests) == 2  # the dropped call and the retake, no third
    assert [c.status for c in await calls(engine)] == ["superseded", "ok"]
    assert [m.status for m in await messages(engine, Message.sender == "user")] == [
        "answered",
        "answered",
    ]


async def assert_whatsapp_answered_once(
    engine: AsyncEngine, providers: FakeProviders, body: str
) -> None:
    """One WhatsApp message to the person, stored once with its sid, on the WhatsApp thread."""
    [sent] = providers.twilio_sent
    assert (sent["To"], sent["Body"]) == ("whatsapp:+15550001111", f"echo: {body}")
    [question] = await messages(engine, Message.sender == "user")
    assert (question.channel, question.status) == ("whatsapp", "answered")
    [reply] = await messages(engine, Message.sender == "assistant")
    assert (reply.channel, reply.provider_message_id) == ("whatsapp", sent["sid"])
    [job] = await jobs(engine)
    assert job.status == "done"


async def test_whatsapp_kill_9_during_the_model_call_then_restart_answers_once(
    start: Callable[..., Any], engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_delay = 30.0
    first = await start()
    await first.whatsapp("Hola")
    await providers.wait_for_async(lambda: providers.openai_requests, timeout=10)
    first.kill()

    providers.openai_delay = 0.0
    await start()
    await done(engine)
    await assert_whatsapp_answered_once(engine, providers, "Hola")
    assert len(providers.openai_requests) == 2


async def test_whatsapp_kill_9_after_twilio_accepted_then_restart_sends_no_second_message(
    start: Callable[..., Any], engine: AsyncEngine, providers: FakeProviders
) -> None:
    """The ambiguous send is looked up in Twilio's list with the `whatsapp:` addresses."""
    providers.twilio_plan(("accept_then_hang", 60))
    first = await start()
    await first.whatsapp("Hola")
    await providers.wait_for_async(lambda: providers.twilio_sent, timeout=10)
    first.kill()

    await start()
    await done(engine)
    await assert_whatsapp_answered_once(engine, providers, "Hola")
    assert providers.twilio_attempts == ["accept_then_hang"]
    assert len(providers.openai_requests) == 1


# ------------------------------------------------------------------ SIGTERM


def assert_clean_shutdown(server: Server) -> None:
    log = server.log
    assert "Application shutdown complete" in log, log
    assert "Traceback" not in log, log


async def test_sigterm_lets_a_running_reply_finish_and_the_next_process_sends_nothing_more(
    start: Callable[..., Any], engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_delay = 1.0
    first = await start()
    await first.text("Hello there")
    await providers.wait_for_async(lambda: providers.openai_requests, timeout=10)
    _, took = await first.terminate(timeout=SHUTDOWN_GRACE_S + 5)
    print(f"exited {took:.2f}s after SIGTERM")
    assert took < 5.0  # the reply took a second: no reason to wait out the whole grace
    assert_clean_shutdown(first)
    assert bodies_sent(providers) == ["echo: Hello there"]  # sent before exiting
    await start()
    await done(engine)
    await assert_answered_once(engine, providers, "Hello there")
    assert len(providers.openai_requests) == 1


async def test_sigterm_gives_a_reply_longer_than_the_grace_to_the_next_process(
    start: Callable[..., Any], engine: AsyncEngine, providers: FakeProviders
) -> None:
    providers.openai_delay = 60.0
    first = await start()
    await first.text("Hello there")
    await providers.wait_for_async(lambda: providers.openai_requests, timeout=10)
    await first.terminate(timeout=SHUTDOWN_GRACE_S + 5)

    assert_clean_shutdown(first)
    [job] = await jobs(engine)
    assert (job.status, job.lease_owner) == ("queued", None)  # given back, not left to expire
    assert providers.twilio_sent == []
    providers.openai_delay = 0.0
    started = time.monotonic()
    await start()
    await done(engine)
    await assert_answered_once(engine, providers, "Hello there")
    assert time.monotonic() - started < START_TIMEOUT_S


async def test_sigterm_exits_promptly_with_status_0(
    start: Callable[..., Any], database_url: str
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("how the process exits does not depend on the database")
    server = await start()
    code, took = await server.terminate(timeout=SHUTDOWN_GRACE_S)

    assert_clean_shutdown(server)
    assert took < 3.0
    assert code == 0


async def test_a_job_finishing_during_shutdown_is_not_taken_over_by_another_worker(
    start: Callable[..., Any], engine: AsyncEngine, providers: FakeProviders, database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("several serving processes on one database: PostgreSQL only")
    providers.openai_delay = 1.6  # longer than the lease, shorter than the shutdown grace
    a, b = await asyncio.gather(start(), start())
    await a.text("Hello there")
    await providers.wait_for_async(lambda: providers.openai_requests, timeout=10)
    [job] = await jobs(engine)
    owner = a if f":{a.process.pid}:" in (job.lease_owner or "") else b
    await owner.terminate(timeout=SHUTDOWN_GRACE_S + 5)
    await done(engine)

    assert bodies_sent(providers) == ["echo: Hello there"]
    assert len(providers.openai_requests) == 1
