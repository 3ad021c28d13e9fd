"""`parley serve` as a real process: start, migrate, answer /healthz, log, stop on SIGTERM;
refuse bad configuration with one clear line and exit code 2."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.settings import SettingsError, load_settings
from tests.conftest import running_app
from tests.processes import free_port, parley_env, serving, start, stop, wait_healthy


def test_serve_migrates_answers_healthz_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = parley_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/fresh.db")
    port = free_port()
    process = start(["serve", "--port", str(port), "--dev"], env, tmp_path, tmp_path / "serve.log")
    try:
        seconds = wait_healthy(port, process)
        print(f"healthy {seconds:.2f}s after start")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
        stopped = time.monotonic()
        assert stop(process, signal.SIGTERM) == 0
        assert time.monotonic() - stopped < 8
    finally:
        if process.poll() is None:
            process.kill()
    log = (tmp_path / "serve.log").read_text()
    assert "Running upgrade" in log and "DEV MODE" in log
    assert "Application shutdown complete" in log  # the lifespan ran to its end


def test_without_secrets_serve_names_each_variable_and_takes_the_hard_open_files_limit(
    tmp_path: Path,
) -> None:
    env = parley_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/p.db")
    for name in ("TWILIO_AUTH_TOKEN", "SENDGRID_INBOUND_USER", "SENDGRID_INBOUND_PASSWORD"):
        env.pop(name, None)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 1024)
    if hard == resource.RLIM_INFINITY or hard <= low:
        pytest.skip(f"the hard open-files limit is {hard}: the kernel's own cap decides")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # what the child inherits
    try:
        with serving(env, tmp_path) as (_port, process):
            limits = Path(f"/proc/{process.pid}/limits").read_text()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    [line] = [x for x in limits.splitlines() if x.startswith("Max open files")]
    assert line.split()[3] == str(hard), line  # the soft limit: was 1024 or less
    log = (tmp_path / "serve.log").read_text()
    assert "TWILIO_AUTH_TOKEN is not set" in log
    assert "SENDGRID_INBOUND_USER and SENDGRID_INBOUND_PASSWORD are not both set" in log


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    env = parley_env(
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/p.db", LOG_FORMAT="json", PARLEY_DEV="1"
    )
    with serving(env, tmp_path) as (port, process):
        httpx.get(f"http://127.0.0.1:{port}/healthz")
        stop(process)
    lines = [line for line in (tmp_path / "serve.log").read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "LOUD"),
        ("DATABASE_URL", "not a url"),
        ("DATABASE_URL", "mysql://localhost/db"),
        ("REPLY_RATE_LIMIT", "abc"),
        ("WORKER_CONCURRENCY", "many"),
        ("ASSISTANT_TIMEOUT_S", "-1"),
        ("PUBLIC_BASE_URL", "parley.example.com"),
    ],
)
def test_bad_configuration_exits_2_naming_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    env = parley_env(**{"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/p.db", variable: value})
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert variable in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_port_that_is_not_a_number_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "eighty"],
        env=parley_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "--port" in result.stderr


def test_settings_parse_rate_limits_and_rotation_tokens() -> None:
    settings = load_settings(
        reply_rate_limit="10 / minute", twilio_auth_token=" new , old ", _env_file=None
    )
    assert (settings.rate_limit.count, settings.rate_limit.window_s) == (10, 60)
    assert settings.twilio_auth_tokens == ["new", "old"]
    with pytest.raises(SettingsError, match="REPLY_RATE_LIMIT"):
        load_settings(reply_rate_limit="0/hour", _env_file=None)


async def test_healthz_is_503_when_the_database_is_gone() -> None:
    settings = load_settings(
        database_url=f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/gone",
        auto_migrate=False,
        embedded_worker=False,
        _env_file=None,
    )
    async with running_app(settings) as client:
        response = await client.get("/healthz")
    assert response.status_code == 503
