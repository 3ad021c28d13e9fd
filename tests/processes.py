"""Running Parley as a real process, as an operator would, for tests that need one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parley_env(**variables: str) -> dict[str, str]:
    """The inherited environment minus any Parley variable, with the reply debounce off, plus
    `variables`."""
    ours = {
        "DATABASE_URL", "PUBLIC_BASE_URL", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN",
        "OPENAI_API_KEY", "OPENAI_BASE_URL", "SENDGRID_API_KEY", "ADMIN_TOKEN", "PARLEY_DEV",
        "EMBEDDED_WORKER", "AUTO_MIGRATE", "LOG_FORMAT", "LOG_LEVEL", "REPLY_DEBOUNCE_S",
        "REPLY_DEBOUNCE_MAX_S",
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env["REPLY_DEBOUNCE_S"] = "0"  # SPEC §12's 1.5 s quiet time, unless a test asks for it
    env.update(variables)
    return env


def provider_variables(
    base_url: str, *, account_sid: str, auth_token: str, openai_key: str, model: str
) -> dict[str, str]:
    """Twilio and an OpenAI-compatible model, both served by the fake provider at `base_url`."""
    return {
        "TWILIO_ACCOUNT_SID": account_sid,
        "TWILIO_AUTH_TOKEN": auth_token,
        "TWILIO_API_BASE_URL": base_url,
        "OPENAI_API_KEY": openai_key,
        "OPENAI_BASE_URL": base_url + "/v1",
        "OPENAI_MODEL": model,
    }


def start(args: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "service", *args],
        env=dict(env),
        cwd=cwd,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_healthy(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> float:
    """Seconds until `/healthz` answered 200."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise AssertionError(f"parley exited early with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("parley did not become healthy")


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"parley did not exit within {timeout}s of signal {sig}") from None


@contextmanager
def serving(
    env: Mapping[str, str], cwd: Path, extra_args: tuple[str, ...] = ()
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    process = start(["serve", "--port", str(port), *extra_args], env, cwd, cwd / "serve.log")
    try:
        wait_healthy(port, process)
        yield port, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
