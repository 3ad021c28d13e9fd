"""Shared test fixtures: a fresh migrated database per test (SQLite always, PostgreSQL when
`TEST_DATABASE_URL` is set), the app driven over HTTP in-process, and fake providers on loopback.

Each database starts as a copy of one migrated template (a file copy on SQLite, `CREATE
DATABASE … TEMPLATE` on PostgreSQL), so a test gets a clean schema at head in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import create_engine
from service.migrate import upgrade
from service.settings import Settings
from service.web.app import create_app
from tests.fakes import FakeProviders

PUBLIC_BASE_URL = "https://parley.example.com"
TWILIO_TOKEN = "test-auth-token-0123456789abcdef"
TWILIO_SID = "AC32d0d85518aa25edef571b53f079c2be"
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")

BACKENDS = ["sqlite"] + (["postgresql"] if TEST_DATABASE_URL else [])


def _migrate(url: str) -> None:
    async def run() -> None:
        engine = create_engine(url)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    _migrate(f"sqlite+aiosqlite:///{path}")
    return path


def _pg_dsn(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if database:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


async def _pg_admin(statement: str) -> None:
    assert TEST_DATABASE_URL
    connection = await asyncpg.connect(_pg_dsn(TEST_DATABASE_URL))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    assert TEST_DATABASE_URL
    name = f"parley_tpl_{secrets.token_hex(4)}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    _migrate(make_url(TEST_DATABASE_URL).set(database=name).render_as_string(False))
    yield name
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database at the latest revision, on each backend."""
    if request.param == "sqlite":
        path = tmp_path / "parley.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    assert TEST_DATABASE_URL
    template = request.getfixturevalue("pg_template")
    name = f"parley_t_{secrets.token_hex(5)}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    yield make_url(TEST_DATABASE_URL).set(database=name).render_as_string(False)
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeProviders]:
    with FakeProviders() as providers:
        yield providers


@pytest.fixture
def providers(fake: FakeProviders) -> Iterator[FakeProviders]:
    """The shared fake providers, emptied for this test."""
    fake.reset()
    yield fake
    fake.reset()


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(database_url: str, providers: FakeProviders) -> SettingsFactory:
    """Settings for a production-like Parley wired to the fake providers; override per test."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "public_base_url": PUBLIC_BASE_URL,
            "auto_migrate": False,
            "twilio_account_sid": TWILIO_SID,
            "twilio_auth_token": TWILIO_TOKEN,
            "twilio_api_base_url": providers.base_url,
            "sendgrid_api_key": "SG.test-key",
            "sendgrid_api_base_url": providers.base_url,
            "sendgrid_inbound_user": "parley",
            "sendgrid_inbound_password": "inbound-secret",
            "openai_api_key": "test-key",
            "openai_base_url": providers.base_url + "/v1",
            "openai_model": "gpt-test",
            "assistant_timeout_s": 5.0,
            "reply_retry_base_s": 0.05,
            # SPEC §12's debounce would add 1.5 s to every reply; the burst tests turn it on.
            "reply_debounce_s": 0.0,
            "_env_file": None,
        }
        values.update(overrides)
        return Settings(**values)

    return build


@contextlib.asynccontextmanager
async def running_app(settings: Settings, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The real app with its lifespan (engine, writer, worker), driven over HTTP in-process;
    `options` go to `create_app` (e.g. a fake `clock`)."""
    app = create_app(settings, **options)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=PUBLIC_BASE_URL) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@pytest.fixture
async def client(make_settings: SettingsFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(make_settings()) as http:
        yield http
