"""Assistant profiles (SPEC §11) as texters and the operator see them: a bakery and a clinic on
two numbers, the "*" default, the greeting, opening hours with a fake clock, the profile in
the API and on the transcript page, and a bad file stopping the process with one line.
In-process app, real SDKs, fake providers on loopback."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.cli import main
from service.models import Message
from service.settings import Settings
from tests.conftest import SettingsFactory, running_app
from tests.fakes import FakeProviders
from tests.helpers import calls, eventually, messages, post_twilio, settled, twilio_form

BAKERY, CLINIC, OTHER = "+14155550100", "+14155550199", "+14155550111"
TEXTER = "+15550001111"
ADMIN_TOKEN = "admin-profiles-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
GREETING = "Hi, this is Rosa's Bakery's assistant. Reply STOP to opt out."
CLOSED = "We're closed right now; we'll answer when we open at 8."
LA = ZoneInfo("America/Los_Angeles")

PROFILES = f"""
[[profile]]
name = "bakery"
addresses = ["{BAKERY}"]
system_prompt = "You are the assistant of Rosa's Bakery in Oakland."
model = "gpt-bakery"
temperature = 0.3
max_tokens = 400
greeting = "{GREETING}"
timezone = "America/Los_Angeles"
hours = {{ mon = "08:00-18:00", tue = "08:00-18:00", sat = "09:00-13:00" }}
after_hours_reply = "{CLOSED}"

[[profile]]
name = "clinic"
addresses = ["{CLINIC}"]
system_prompt = "You are the front desk of the Elm Street Clinic."
model = "gpt-clinic"
max_tokens = 200

[[profile]]
name = "default"
addresses = ["*"]
system_prompt = "You are the default assistant."
"""


class FakeClock:
    """What opening hours are judged by: moved by the test, never slept through."""

    def __init__(self, local: str) -> None:
        self.set(local)

    def set(self, local: str) -> None:
        self.now = dt.datetime.fromisoformat(local).replace(tzinfo=LA).astimezone(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


MONDAY_NOON = "2026-11-30T12:00"


def settings_with(make_settings: SettingsFactory, tmp_path: Path, text: str = PROFILES) -> Settings:
    path = tmp_path / "profiles.toml"
    path.write_text(text, encoding="utf-8")
    return make_settings(profiles_file=str(path), admin_token=ADMIN_TOKEN, worker_poll_s=0.05)


async def text(client: httpx.AsyncClient, body: str, to: str = BAKERY) -> None:
    response = await post_twilio(client, twilio_form(Body=body, To=to))
    assert response.status_code == 200, response.text


async def done(engine: AsyncEngine) -> None:
    await eventually(lambda: settled(engine))


def system_prompt(request: dict[str, Any]) -> str:
    content: str = request["messages"][0]["content"]
    return content


def sent_to(providers: FakeProviders, number: str) -> list[str]:
    return [s["Body"] for s in providers.twilio_sent if s["From"] == number]


# ------------------------------------------------------------------ one assistant per number


async def test_a_bakery_and_a_clinic_on_two_numbers_get_their_own_prompt_and_model(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders, tmp_path: Path
) -> None:
    clock = FakeClock(MONDAY_NOON)
    async with running_app(settings_with(make_settings, tmp_path), clock=clock) as client:
        await text(client, "Do you have sourdough?", to=BAKERY)
        await done(engine)
        await text(client, "Can I move my appointment?", to=CLINIC)
        await done(engine)
        await text(client, "Hello?", to=OTHER)
        await done(engine)
        [conversation] = [
            c
            for c in (await client.get("/api/conversations", headers=AUTH)).json()["conversations"]
            if c["local_address"] == BAKERY
        ]
        detail = (await client.get(f"/api/conversations/{conversation['id']}", headers=AUTH)).json()

    bakery, clinic, other = providers.openai_requests
    assert (bakery["model"], bakery["temperature"], bakery["max_tokens"]) == (
        "gpt-bakery",
        0.3,
        400,
    )
    assert system_prompt(bakery).startswith("You are the assistant of Rosa's Bakery in Oakland.")
    assert (clinic["model"], clinic["max_tokens"]) == ("gpt-clinic", 200)
    assert "temperature" not in clinic
    assert system_prompt(clinic).startswith("You are the front desk of the Elm Street Clinic.")
    # A number no profile names gets the "*" profile, its other keys from the variables.
    assert other["model"] == "gpt-test" and system_prompt(other).startswith("You are the default")
    assert sent_to(providers, CLINIC) == ["echo: Can I move my appointment?"]
    assert sent_to(providers, OTHER) == ["echo: Hello?"]

    by_profile = {c.generation_params.get("profile"): c for c in await calls(engine)}
    assert set(by_profile) == {"bakery", "clinic", "default"}
    assert by_profile["bakery"].model == "gpt-bakery"
    assert by_profile["bakery"].generation_params["max_tokens"] == 400
    assert detail["profile"] == "bakery"
    [call] = detail["assistant_calls"]
    assert (call["profile"], call["purpose"], call["model"]) == ("bakery", "reply", "gpt-bakery")


async def test_without_a_profiles_file_the_variables_alone_answer(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    async with running_app(make_settings(worker_poll_s=0.05)) as client:
        await text(client, "hi", to=BAKERY)
        await done(engine)
    [request] = providers.openai_requests
    assert request["model"] == "gpt-test" and "temperature" not in request
    [call] = await calls(engine)
    assert "profile" not in call.generation_params and call.purpose == "reply"


# ------------------------------------------------------------------ the greeting


async def test_the_greeting_goes_once_before_the_first_reply_exactly_as_written(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders, tmp_path: Path
) -> None:
    clock = FakeClock(MONDAY_NOON)
    async with running_app(settings_with(make_settings, tmp_path), clock=clock) as client:
        for body in ("one", "two", "three"):
            await text(client, body)
            await done(engine)
        [conversation] = (await client.get("/api/conversations", headers=AUTH)).json()[
            "conversations"
        ]
        page = await client.get(conversation["transcript_url"])

    assert sent_to(providers, BAKERY) == [GREETING, "echo: one", "echo: two", "echo: three"]
    greeting, *replies = await messages(engine, Message.sender == "assistant")
    assert (greeting.body, greeting.author, greeting.fixed_kind) == (GREETING, "fixed", "greeting")
    assert all(r.author == "model" and r.fixed_kind is None for r in replies)
    # The greeting is not history: the model never sees it as its own words.
    assert all(GREETING not in str(r["messages"][1:]) for r in providers.openai_requests)
    assert "Greeting (automatic)" in page.text and "assistant profile: bakery" in page.text


async def test_help_as_the_first_message_is_greeted_and_stop_is_not(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders, tmp_path: Path
) -> None:
    clock = FakeClock(MONDAY_NOON)
    async with running_app(settings_with(make_settings, tmp_path), clock=clock) as client:
        await text(client, "HELP")
        await done(engine)
        await text(client, "STOP", to=CLINIC)
        await done(engine)
    bakery = sent_to(providers, BAKERY)
    assert bakery[0] == GREETING and bakery[1].startswith("Parley:") and len(bakery) == 2
    assert sent_to(providers, CLINIC) == []


# ------------------------------------------------------------------ opening hours


async def test_after_hours_reply_once_per_closed_period_then_not_answered_then_open_again(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders, tmp_path: Path
) -> None:
    clock = FakeClock("2026-11-30T19:30")  # Monday evening, after 18:00
    async with running_app(settings_with(make_settings, tmp_path), clock=clock) as client:
        await text(client, "Are you open?")
        await done(engine)
        await text(client, "Hello??")
        await done(engine)
        clock.set("2026-12-01T02:00")  # after midnight: the same closed period
        await text(client, "Still there?")
        await done(engine)
        assert providers.openai_requests == []
        clock.set("2026-12-01T09:00")  # Tuesday morning: open
        await text(client, "Good morning")
        await done(engine)
        clock.set("2026-12-01T18:30")  # Tuesday evening: a new closed period
        await text(client, "One more thing")
        await done(engine)
        [conversation] = (await client.get("/api/conversations", headers=AUTH)).json()[
            "conversations"
        ]
        page = await client.get(conversation["transcript_url"])

    assert sent_to(providers, BAKERY) == [GREETING, CLOSED, "echo: Good morning", CLOSED]
    assert [r["messages"][-1]["content"] for r in providers.openai_requests] == ["Good morning"]
    inbound = await messages(engine, Message.sender == "user")
    assert [m.status for m in inbound] == [
        "answered",
        "not_answered",
        "not_answered",
        "answered",
        "answered",
    ]
    assert "after-hours reply was already sent" in (inbound[1].error or "")
    closed = await messages(engine, Message.fixed_kind == "after_hours")
    assert [(m.author, m.body) for m in closed] == [("fixed", CLOSED)] * 2
    assert "After-hours reply (automatic)" in page.text
    assert "outside opening hours" in page.text
    assert len(await calls(engine)) == 1  # the fixed texts never call the model


# ------------------------------------------------------------------ a bad file

BAD_FILES = {
    "syntax": ("[[profile]\n", "TOML syntax"),
    "unknown key": (
        '[[profile]]\nname = "bakery"\naddresses = ["*"]\nmodle = "x"\n',
        "profile 'bakery': key 'modle': unknown key",
    ),
    "timezone": (
        '[[profile]]\nname = "bakery"\naddresses = ["*"]\ntimezone = "Mars/Base"\n',
        "profile 'bakery': key 'timezone': unknown timezone",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_profiles_check_names_the_file_the_profile_and_the_key(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text_, expected = BAD_FILES[case]
    path = tmp_path / "profiles.toml"
    path.write_text(text_, encoding="utf-8")
    assert main(["profiles", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and expected in err, err


def test_profiles_check_lists_the_profiles_with_their_addresses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(PROFILES, encoding="utf-8")
    assert main(["profiles", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"bakery: {BAKERY}" in out and f"clinic: {CLINIC}" in out and "default: *" in out


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_serve_and_worker_stop_at_start_with_exit_2_and_one_line(
    command: str, tmp_path: Path
) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(BAD_FILES["unknown key"][0], encoding="utf-8")
    env = {
        **os.environ,
        "PROFILES_FILE": str(path),
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/never.db",
    }
    done_ = subprocess.run(
        [sys.executable, "-m", "service", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert done_.returncode == 2
    assert done_.stderr.count("\n") == 1, done_.stderr
    assert str(path) in done_.stderr and "profile 'bakery': key 'modle'" in done_.stderr
    assert not (tmp_path / "never.db").exists()  # stopped before touching the database
