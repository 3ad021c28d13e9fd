"""Assistant profiles (`PROFILES_FILE`, SPEC §11): one assistant per number or address.

Pure rules, no I/O beyond reading the file once: the file's shape (TOML read with `tomllib`,
validated with pydantic, every problem reported as one line naming the file, the profile and
the key), picking a profile by the conversation's local address, each key's fallback to the
`ASSISTANT_*`/`OPENAI_*` variables, and opening hours: whether a moment is open and which
*closed period* it falls in (so the after-hours reply goes out once per period).
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if TYPE_CHECKING:
    from service.settings import Settings

DEFAULT_ADDRESS = "*"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Memory = Literal["window", "summary"]

_E164 = re.compile(r"^\+[1-9]\d{1,14}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_SPAN = re.compile(r"^\s*(\d{2}):(\d{2})\s*-\s*(\d{2}):(\d{2})\s*$")


class ProfileError(Exception):
    """A bad profiles file, as one line: the file, the profile and the key."""

    def __init__(
        self, file: str, message: str, profile: str | None = None, key: str | None = None
    ) -> None:
        where = [file]
        if profile is not None:
            where.append(f"profile {profile!r}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(f"{': '.join(where)}: {message}")


# ---------------------------------------------------------------- opening hours


@dataclass(frozen=True)
class Hours:
    """Open spans per weekday (0 = Monday) in minutes since local midnight; days missing are
    closed. A span may end at 24:00; it never crosses midnight (write two days' spans)."""

    timezone: ZoneInfo
    spans: Mapping[int, tuple[int, int]]

    def is_open(self, moment: dt.datetime) -> bool:
        local = moment.astimezone(self.timezone)
        span = self.spans.get(local.weekday())
        minute = local.hour * 60 + local.minute
        return span is not None and span[0] <= minute < span[1]

    def closed_period(self, moment: dt.datetime) -> str:
        """The identity of the closed period holding `moment`: the local time it ends (the next
        opening), so a night and a closed Sunday between two open days are one period, and
        midnight does not start a new one. "never" when the profile never opens."""
        local = moment.astimezone(self.timezone)
        minute = local.hour * 60 + local.minute
        for ahead in range(8):
            day = local.date() + dt.timedelta(days=ahead)
            span = self.spans.get(day.weekday())
            if span is None or (ahead == 0 and span[0] <= minute):
                continue
            opening = dt.datetime.combine(day, dt.time()) + dt.timedelta(minutes=span[0])
            return opening.strftime("%Y-%m-%dT%H:%M")
        return "never"


def parse_hours(hours: Mapping[str, str], timezone: ZoneInfo) -> Hours:
    """`{mon = "08:00-18:00", …}` as `Hours`; raises ValueError naming the bad day."""
    spans: dict[int, tuple[int, int]] = {}
    for day, text in hours.items():
        if day not in DAYS:
            raise ValueError(f"unknown day {day!r}: use {', '.join(DAYS)}")
        match = _SPAN.match(text)
        if match is None:
            raise ValueError(f"{day} = {text!r}: expected HH:MM-HH:MM, e.g. 08:00-18:00")
        start_h, start_m, end_h, end_m = (int(g) for g in match.groups())
        start, end = start_h * 60 + start_m, end_h * 60 + end_m
        if start_h > 23 or start_m > 59 or end_m > 59 or end > 24 * 60 or start >= end:
            raise ValueError(f"{day} = {text!r}: expected an opening before the closing, by 24:00")
        spans[DAYS.index(day)] = (start, end)
    return Hours(timezone, spans)


# ---------------------------------------------------------------- the file's shape


MAX_TOKENS = 1_000_000  # no model answers more in one call
MAX_HISTORY_MESSAGES = 1_000
MAX_HISTORY_TOKENS = 2_000_000


class ProfileIn(BaseModel):
    """One `[[profile]]` table as written; every key but `name` and `addresses` optional."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1)
    addresses: list[str] = Field(min_length=1)
    system_prompt: str | None = None
    model: str | None = Field(None, min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    # Bounded, so a typo is caught by `profiles check`, not by every model call failing.
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    history_messages: int | None = Field(None, ge=0, le=MAX_HISTORY_MESSAGES)
    history_tokens: int | None = Field(None, ge=0, le=MAX_HISTORY_TOKENS)
    memory: Memory | None = None
    greeting: str | None = Field(None, min_length=1)
    timezone: str | None = None
    hours: dict[str, str] | None = None
    after_hours_reply: str | None = Field(None, min_length=1)

    @field_validator("temperature", mode="before")
    @classmethod
    def _integer_temperature(cls, value: object) -> object:
        # TOML's `temperature = 1` is an integer; strict mode would refuse it.
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        return [normalise_address(value) for value in values]

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        if value is not None:
            zone(value)
        return value


class FileIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    profile: list[ProfileIn] = Field(default_factory=list)


def normalise_address(value: str) -> str:
    """A local address as conversations store it: E.164, a bare lower-cased email, or "*"."""
    value = value.strip()
    if value == DEFAULT_ADDRESS or _E164.match(value):
        return value
    if _EMAIL.match(value):
        return value.lower()
    raise ValueError(
        f"{value!r} is not an E.164 number (+14155550100), an email address or {DEFAULT_ADDRESS!r}"
    )


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r} (an IANA name, e.g. Europe/Paris)") from None


# ---------------------------------------------------------------- resolved profiles


@dataclass(frozen=True)
class Assistant:
    """What one conversation's assistant is: a profile's keys, each falling back to the
    variables. `profile` is None when no profile applies (the variables alone)."""

    profile: str | None
    system_prompt: str | None
    model: str
    temperature: float | None
    max_tokens: int | None
    history_messages: int
    history_tokens: int
    memory: Memory
    greeting: str | None = None
    hours: Hours | None = None
    after_hours_reply: str | None = None

    def is_open(self, moment: dt.datetime) -> bool:
        return self.hours is None or self.hours.is_open(moment)


@dataclass(frozen=True)
class Profiles:
    """The loaded file: profiles by address, resolved against the variables once."""

    source: str | None
    by_address: Mapping[str, Assistant]
    listed: tuple[tuple[Assistant, tuple[str, ...]], ...]
    fallback: Assistant

    def pick(self, local_address: str) -> Assistant:
        """The profile for this local address, else the "*" profile, else the variables."""
        key = local_address.lower() if "@" in local_address else local_address
        return self.by_address.get(key) or self.by_address.get(DEFAULT_ADDRESS) or self.fallback


def no_profiles(defaults: Assistant) -> Profiles:
    return Profiles(None, {}, (), defaults)


def load_profiles(path: str | Path, defaults: Assistant) -> Profiles:
    """Read and validate the file; raises `ProfileError` (one line) for any problem."""
    name = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(name, f"cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ProfileError(name, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(name, f"TOML syntax: {exc}") from None
    return parse_profiles(data, defaults, name)


def parse_profiles(data: Mapping[str, Any], defaults: Assistant, source: str) -> Profiles:
    try:
        parsed = FileIn.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, data, source) from None
    _check_unique(parsed.profile, source)
    listed = tuple((_resolve(p, defaults, source), tuple(p.addresses)) for p in parsed.profile)
    by_address = {address: assistant for assistant, addresses in listed for address in addresses}
    return Profiles(source, by_address, listed, defaults)


def _first_error(exc: ValidationError, data: Mapping[str, Any], source: str) -> ProfileError:
    error = exc.errors()[0]
    loc = error["loc"]
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    if not loc or loc[0] != "profile":
        return ProfileError(source, message, key=str(loc[0]) if loc else None)
    if len(loc) < 2:
        return ProfileError(source, "expected [[profile]] tables", key="profile")
    raw = data.get("profile")
    index = loc[1] if isinstance(loc[1], int) else 0
    table = raw[index] if isinstance(raw, list) and index < len(raw) else {}
    name = table.get("name") if isinstance(table, dict) else None
    profile = name if isinstance(name, str) else f"#{index + 1}"
    key = ".".join(str(part) for part in loc[2:]) or None
    return ProfileError(source, message, profile=profile, key=key)


def _check_unique(profiles: Iterable[ProfileIn], source: str) -> None:
    names: set[str] = set()
    owners: dict[str, str] = {}
    for profile in profiles:
        if profile.name in names:
            raise ProfileError(source, "duplicate name", profile=profile.name, key="name")
        names.add(profile.name)
        for address in profile.addresses:
            if address in owners:
                raise ProfileError(
                    source,
                    f"address {address!r} is taken by profile {owners[address]!r}",
                    profile=profile.name,
                    key="addresses",
                )
            owners[address] = profile.name


def _resolve(profile: ProfileIn, defaults: Assistant, source: str) -> Assistant:
    hours = None
    if profile.hours is not None:
        try:
            hours = parse_hours(profile.hours, zone(profile.timezone or "UTC"))
        except ValueError as exc:
            raise ProfileError(source, str(exc), profile=profile.name, key="hours") from None

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return Assistant(
        profile=profile.name,
        system_prompt=pick(profile.system_prompt, defaults.system_prompt),
        model=pick(profile.model, defaults.model),
        temperature=pick(profile.temperature, defaults.temperature),
        max_tokens=pick(profile.max_tokens, defaults.max_tokens),
        history_messages=pick(profile.history_messages, defaults.history_messages),
        history_tokens=pick(profile.history_tokens, defaults.history_tokens),
        memory=pick(profile.memory, defaults.memory),
        greeting=profile.greeting,
        hours=hours,
        after_hours_reply=profile.after_hours_reply,
    )


# ---------------------------------------------------------------- from the variables


def from_variables(settings: Settings) -> Assistant:
    """The assistant of the variables alone: what every profile key falls back to."""
    return Assistant(
        profile=None,
        system_prompt=settings.assistant_system_prompt,
        model=settings.openai_model,
        temperature=None,
        max_tokens=None,
        history_messages=settings.assistant_history_messages,
        history_tokens=settings.assistant_history_tokens,
        memory=settings.assistant_memory,
    )


def profiles_of(settings: Settings) -> Profiles:
    """`PROFILES_FILE` read and resolved (raises `ProfileError`), or the variables alone."""
    defaults = from_variables(settings)
    if not settings.profiles_file:
        return no_profiles(defaults)
    return load_profiles(settings.profiles_file, defaults)
