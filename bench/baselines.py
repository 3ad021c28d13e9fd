"""The two baselines Parley's SMS webhook is measured against, served by uvicorn like Parley:

* `bare`: Starlette form parse + Twilio signature check, nothing stored;
* `one_insert`: the same plus one SQLAlchemy ORM insert and commit per request, through an
  engine configured exactly like Parley's (same SQLite pragmas), so the comparison measures
  the write path's design, not its configuration;
* `one_insert_plain`: the same with SQLAlchemy's default engine.

The ratio printed for Parley is against the faster of the two one-insert baselines.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from sqlalchemy import String, Text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from service.db import create_engine, session_factory

TOKEN = os.environ.get("TWILIO_AUTH_TOKEN", "bench-token")
URL = os.environ.get("PUBLIC_BASE_URL", "https://parley.example.com") + "/webhooks/twilio/sms"
TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
validator = RequestValidator(TOKEN)


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "inbound"
    id: Mapped[int] = mapped_column(primary_key=True)
    sid: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)


async def _checked_form(request: Request) -> dict[str, str] | None:
    form = await request.form()
    if not validator.validate(URL, form, request.headers.get("x-twilio-signature", "")):
        return None
    return {k: str(v) for k, v in form.items()}


async def bare_webhook(request: Request) -> Response:
    if await _checked_form(request) is None:
        return Response(status_code=403)
    return Response(TWIML, media_type="text/xml")


DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///./baseline.db")


def one_insert_app(engine: AsyncEngine) -> Starlette:
    """One ORM insert and commit per request, in its own session."""
    sessions = session_factory(engine)

    async def insert_webhook(request: Request) -> Response:
        form = await _checked_form(request)
        if form is None:
            return Response(status_code=403)
        async with sessions.begin() as session:
            session.add(Row(sid=form["MessageSid"], body=form["Body"]))
        return Response(TWIML, media_type="text/xml")

    @contextlib.asynccontextmanager
    async def schema(_app: Starlette) -> AsyncIterator[None]:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        yield
        await engine.dispose()

    return Starlette(
        routes=[Route("/webhooks/twilio/sms", insert_webhook, methods=["POST"])], lifespan=schema
    )


def bare() -> Starlette:
    return Starlette(routes=[Route("/webhooks/twilio/sms", bare_webhook, methods=["POST"])])


def one_insert() -> Starlette:
    """With Parley's engine configuration (WAL, synchronous=NORMAL, BEGIN IMMEDIATE)."""
    return one_insert_app(create_engine(DATABASE_URL))


def one_insert_plain() -> Starlette:
    """With SQLAlchemy's defaults, as most services start."""
    return one_insert_app(create_async_engine(DATABASE_URL))
