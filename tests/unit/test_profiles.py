"""The profile rules (service/profiles.py): the file's validation as one line naming file,
profile and key; picking by local address; each key's fallback; opening hours and the identity
of a closed period, on fixed moments (no clock, no sleeping)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from service.profiles import Assistant, ProfileError, load_profiles, parse_hours

DEFAULTS = Assistant(
    profile=None,
    system_prompt="the variables' prompt",
    model="gpt-variables",
    temperature=None,
    max_tokens=None,
    history_messages=20,
    history_tokens=4000,
    memory="window",
)

EXAMPLE = """
[[profile]]
name = "bakery"
addresses = ["+14155550100", "Hello@Bakery.example"]
system_prompt = "You are the assistant of Rosa's Bakery in Oakland."
model = "gpt-4o-mini"
temperature = 0.3
max_tokens = 400
history_messages = 20
history_tokens = 4000
memory = "summary"
greeting = "Hi, this is Rosa's Bakery's assistant. Reply STOP to opt out."
timezone = "America/Los_Angeles"
hours = { mon = "08:00-18:00", tue = "08:00-18:00", sat = "09:00-13:00" }
after_hours_reply = "We're closed right now; we'll answer when we open at 8."

[[profile]]
name = "clinic"
addresses = ["+14155550199"]
temperature = 1

[[profile]]
name = "default"
addresses = ["*"]
system_prompt = "You are the default assistant."
"""
LA = ZoneInfo("America/Los_Angeles")


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "profiles.toml"
    path.write_text(text, encoding="utf-8")
    return load_profiles(path, DEFAULTS)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ProfileError) as caught:
        load(tmp_path, text)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "profiles.toml")), message
    return message


def at(text: str) -> dt.datetime:
    """A local moment in Los Angeles."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=LA)


# ------------------------------------------------------------------ the file


def test_the_spec_example_loads_with_every_key(tmp_path: Path) -> None:
    profiles = load(tmp_path, EXAMPLE)
    bakery = profiles.pick("+14155550100")  # type: ignore[attr-defined]
    assert bakery.profile == "bakery"
    assert (bakery.model, bakery.temperature, bakery.max_tokens) == ("gpt-4o-mini", 0.3, 400)
    assert (bakery.history_messages, bakery.history_tokens, bakery.memory) == (20, 4000, "summary")
    assert bakery.greeting.startswith("Hi, this is Rosa's")
    assert bakery.after_hours_reply.startswith("We're closed")
    assert bakery.hours is not None and bakery.hours.timezone.key == "America/Los_Angeles"
    assert profiles.pick("hello@bakery.example").profile == "bakery"  # type: ignore[attr-defined]


def test_keys_fall_back_to_the_variables_and_unknown_addresses_to_the_default(
    tmp_path: Path,
) -> None:
    profiles = load(tmp_path, EXAMPLE)
    clinic = profiles.pick("+14155550199")  # type: ignore[attr-defined]
    assert (clinic.profile, clinic.model, clinic.system_prompt) == (
        "clinic",
        "gpt-variables",
        "the variables' prompt",
    )
    assert clinic.temperature == 1.0 and clinic.hours is None and clinic.greeting is None
    other = profiles.pick("+15550000000")  # type: ignore[attr-defined]
    assert other.profile == "default" and other.system_prompt == "You are the default assistant."


def test_without_a_default_profile_other_addresses_get_the_variables_alone(
    tmp_path: Path,
) -> None:
    profiles = load(tmp_path, '[[profile]]\nname = "a"\naddresses = ["+14155550100"]\n')
    assert profiles.pick("+15550000000") == DEFAULTS  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[profile]\nname = 1", "TOML syntax"),
        (
            '[[profile]]\nname = "a"\naddresses = ["*"]\ncolour = "red"\n',
            "'a': key 'colour': unknown key",
        ),
        (
            '[[profile]]\nname = "a"\naddresses = ["*"]\n'
            '[[profile]]\nname = "a"\naddresses = ["+14155550100"]\n',
            "profile 'a': key 'name': duplicate name",
        ),
        (
            '[[profile]]\nname = "a"\naddresses = ["*"]\n'
            '[[profile]]\nname = "b"\naddresses = ["*"]\n',
            "profile 'b': key 'addresses': address '*' is taken by profile 'a'",
        ),
        (
            '[[profile]]\nname = "a"\naddresses = ["*"]\ntimezone = "Mars/Olympus"\n',
            "profile 'a': key 'timezone': unknown timezone 'Mars/Olympus'",
        ),
        (
            '[[profile]]\nname = "a"\naddresses = ["*"]\nhours = { mon = "8-18" }\n',
            "profile 'a': key 'hours': mon = '8-18': expected HH:MM-HH:MM",
        ),
        (
            '[[profile]]\nname = "a"\naddresses = ["*"]\nhours = { mon = "18:00-08:00" }\n',
            "profile 'a': key 'hours'",
        ),
        (
            '[[profile]]\nname = "a"\naddresses = ["*"]\nhours = { monday = "08:00-18:00" }\n',
            "profile 'a': key 'hours': unknown day 'monday'",
        ),
        (
            '[[profile]]\nname = "a"\naddresses = ["*"]\nmax_tokens = "400"\n',
            "'a': key 'max_tokens'",
        ),
        (
            '[[profile]]\nname = "a"\naddresses = ["*"]\nmax_tokens = 99999999999999999999\n',
            "'a': key 'max_tokens'",
        ),
        (
            '[[profile]]\nname = "a"\naddresses = ["*"]\nhistory_messages = 5000000\n',
            "'a': key 'history_messages'",
        ),
        ('[[profile]]\nname = "a"\naddresses = ["*"]\nmemory = "forever"\n', "'a': key 'memory'"),
        (
            '[[profile]]\nname = "a"\naddresses = ["555-0100"]\n',
            "'a': key 'addresses': '555-0100' is not an E.164 number",
        ),
        ('[[profile]]\naddresses = ["*"]\n', "profile '#1': key 'name': Field required"),
        ("profiles = 3\n", "key 'profiles': unknown key"),
    ],
)
def test_a_bad_file_is_one_line_naming_file_profile_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert expected in error_of(tmp_path, text)


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read the file"):
        load_profiles(tmp_path / "nope.toml", DEFAULTS)


# ------------------------------------------------------------------ hours

HOURS = parse_hours({"mon": "08:00-18:00", "tue": "08:00-18:00", "sat": "09:00-13:00"}, LA)


@pytest.mark.parametrize(
    ("moment", "is_open"),
    [
        ("2026-11-30T08:00", True),  # a Monday, opening minute
        ("2026-11-30T17:59", True),
        ("2026-11-30T18:00", False),  # closing minute
        ("2026-11-30T07:59", False),
        ("2026-12-02T12:00", False),  # Wednesday: not listed, closed
        ("2026-12-05T10:00", True),  # Saturday
    ],
)
def test_open_within_the_days_spans_in_the_profiles_timezone(moment: str, is_open: bool) -> None:
    assert HOURS.is_open(at(moment)) is is_open


def test_hours_are_judged_in_the_profiles_timezone_not_utc() -> None:
    # 16:00 UTC on a Monday is 08:00 in Los Angeles: open; 02:00 UTC Tuesday is 18:00 Monday.
    assert HOURS.is_open(dt.datetime(2026, 11, 30, 16, 0, tzinfo=dt.UTC))
    assert not HOURS.is_open(dt.datetime(2026, 12, 1, 2, 0, tzinfo=dt.UTC))


def test_a_closed_period_runs_from_a_closing_to_the_next_opening_across_midnight() -> None:
    evening = HOURS.closed_period(at("2026-11-30T19:00"))  # Monday evening
    night = HOURS.closed_period(at("2026-12-01T02:00"))  # after midnight
    morning = HOURS.closed_period(at("2026-12-01T07:59"))
    assert evening == night == morning == "2026-12-01T08:00"
    # Tuesday evening to Saturday morning (Wednesday to Friday closed) is one period.
    assert (
        HOURS.closed_period(at("2026-12-01T18:30"))
        == HOURS.closed_period(at("2026-12-03T12:00"))
        == "2026-12-05T09:00"
    )
    assert HOURS.closed_period(at("2026-12-01T19:00")) != evening


def test_a_profile_with_no_open_day_is_one_closed_period() -> None:
    never = parse_hours({}, LA)
    assert not never.is_open(at("2026-11-30T12:00"))
    assert never.closed_period(at("2026-11-30T12:00")) == "never"


def test_a_span_may_end_at_midnight() -> None:
    late = parse_hours({"fri": "18:00-24:00"}, LA)
    assert late.is_open(at("2026-12-04T23:59"))
    assert not late.is_open(at("2026-12-05T00:00"))
