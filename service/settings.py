"""Every operator-facing knob, read once from the environment (and an optional `.env`).

The rest of Parley receives a `Settings` object and never reads `os.environ` itself, so tests
build one with explicit values and a bad value is reported once, at start, naming the variable.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)\s*$")
_WINDOW_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


@dataclass(frozen=True)
class RateLimit:
    """At most `count` in `window_s` seconds: replies per conversation (`REPLY_RATE_LIMIT`),
    model calls per deployment (`MODEL_CALLS_LIMIT`)."""

    count: int
    window_s: int

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        match = _RATE.match(text.lower())
        if not match or int(match.group(1)) < 1:
            raise ValueError("expected N/second, N/minute, N/hour or N/day, e.g. 60/hour")
        return cls(int(match.group(1)), _WINDOW_SECONDS[match.group(2)])

    @classmethod
    def parse_or_unlimited(cls, text: str) -> RateLimit | None:
        """Like `parse`, and `0` means no limit (None)."""
        return None if text.strip() == "0" else cls.parse(text)


def pool_size(concurrency: int) -> int:
    """PostgreSQL connections per process for a worker running `concurrency` jobs: one per 32
    jobs in flight, at least 4, at most 10 (a job holds one only for a short transaction).
    5 processes (`parley serve` and 4 `parley worker`) then hold at most 5 x (10 + 1 LISTEN)
    = 55 of PostgreSQL's default 100 connections."""
    return max(4, min(10, concurrency // 32))


class SettingsError(Exception):
    """A configuration value is unusable; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    database_url: str = "sqlite+aiosqlite:///./parley.db"
    public_base_url: str | None = None
    auto_migrate: bool = True
    parley_dev: bool = False

    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None
    twilio_api_base_url: str = "https://api.twilio.com"
    whatsapp_template_sid: str | None = None  # sent outside WhatsApp's 24-hour window

    sendgrid_api_key: str | None = None
    sendgrid_api_base_url: str = "https://api.sendgrid.com"
    sendgrid_inbound_user: str | None = None
    sendgrid_inbound_password: str | None = None

    openai_api_key: str | None = None
    openai_base_url: str | None = None
    openai_model: str = "gpt-4o-mini"
    assistant_system_prompt: str | None = None
    assistant_history_messages: int = Field(20, ge=0, le=1000)
    assistant_history_tokens: int = Field(4000, ge=0)
    assistant_timeout_s: float = Field(30.0, gt=0)
    assistant_vision: bool = True  # MMS images to the model as image parts (else a note)
    media_max_bytes: int = Field(5_242_880, ge=1)  # largest MMS item fetched for the model
    media_memory_bytes: int = Field(67_108_864, ge=1)  # picture bytes a process holds at once
    profiles_file: str | None = None  # TOML assistant profiles per local address (SPEC §11)
    assistant_memory: Literal["window", "summary"] = "window"
    summary_keep_messages: int = Field(10, ge=1)  # kept word for word beside the summary

    embedded_worker: bool = True
    worker_concurrency: int = Field(256, ge=1)  # see README, "Decisions": SPEC said 32
    reply_max_attempts: int = Field(6, ge=1)
    reply_debounce_s: float = Field(1.5, ge=0)  # quiet time a burst waits for; 0 = off (§12)
    reply_debounce_max_s: float = Field(8.0, ge=0)  # never longer after its oldest message
    # Beyond the spec's table: tuning knobs with safe defaults (see README, "Configuration").
    reply_retry_base_s: float = Field(2.0, gt=0)  # first retry's delay; doubles each try
    reply_lease_s: float = Field(30.0, ge=1)  # a dead worker's jobs are taken over after this
    provider_timeout_s: float = Field(15.0, gt=0)  # one send to Twilio or SendGrid
    worker_poll_s: float = Field(1.0, gt=0)  # how often an idle worker looks for due jobs
    shutdown_grace_s: float = Field(10.0, ge=0)  # running replies may finish this long on stop
    media_timeout_s: float = Field(10.0, gt=0)  # one MMS item's fetch, redirects included
    # Hosts Twilio's media URLs may redirect to (its CDN); fetched without credentials.
    twilio_media_redirect_hosts: str = "*.twiliocdn.com,s3-external-1.amazonaws.com"
    reply_rate_limit: str = "60/hour"
    model_calls_limit: str = "10000/hour"  # the whole deployment's; "0" = unlimited
    max_email_bytes: int = Field(31_457_280, ge=1024)
    admin_token: str | None = None
    db_pool_size: int = Field(0, ge=0)  # PostgreSQL connections a process; 0: from concurrency
    # PostgreSQL ends a session idle this long inside a transaction; 0: the server's own setting
    db_idle_in_transaction_s: float = Field(10.0, ge=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("assistant_memory", mode="before")
    @classmethod
    def _lower_memory(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL: {exc}") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("only sqlite+aiosqlite:// and postgresql+asyncpg:// are supported")
        if url.get_driver_name() not in ("aiosqlite", "asyncpg"):
            raise ValueError("use an async driver: sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @field_validator("reply_rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        RateLimit.parse(value)
        return value

    @field_validator("model_calls_limit")
    @classmethod
    def _check_model_calls_limit(cls, value: str) -> str:
        try:
            RateLimit.parse_or_unlimited(value)
        except ValueError:
            raise ValueError(
                "expected 0 (unlimited) or N/second, N/minute, N/hour or N/day"
            ) from None
        return value

    @field_validator("public_base_url")
    @classmethod
    def _check_public_base_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("expected an absolute http(s) URL such as https://parley.example.com")
        return value.rstrip("/")

    @property
    def rate_limit(self) -> RateLimit:
        return RateLimit.parse(self.reply_rate_limit)

    @property
    def model_calls_cap(self) -> RateLimit | None:
        return RateLimit.parse_or_unlimited(self.model_calls_limit)

    @property
    def database_connections(self) -> int:
        """The PostgreSQL pool of one process: `DB_POOL_SIZE`, or sized from the concurrency."""
        return self.db_pool_size or pool_size(self.worker_concurrency)

    @property
    def twilio_auth_tokens(self) -> list[str]:
        """During rotation `TWILIO_AUTH_TOKEN` holds two comma-separated tokens."""
        return [t.strip() for t in (self.twilio_auth_token or "").split(",") if t.strip()]


def load_settings(**overrides: object) -> Settings:
    """Read the environment once; turn pydantic's report into one line naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        variable = str(first["loc"][0]).upper() if first["loc"] else "configuration"
        raise SettingsError(f"invalid {variable}={first.get('input')!r}: {first['msg']}") from None


EXIT_CONFIG = 2


def settings_or_exit(**overrides: object) -> Settings:
    """For the commands: a bad value is one line on stderr naming the variable, exit code 2."""
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        print(f"parley: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
