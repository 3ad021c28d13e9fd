"""What a Parley process runs on, set up and torn down once: the engine (migrated when
`AUTO_MIGRATE`), the provider clients, the model and, when wanted, the reply worker. The web
app's lifespan and `parley worker` both use `started`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from service.assistant import Model, create_model
from service.channels.base import ChannelClient
from service.channels.email import SendGridEmail
from service.channels.sms import TwilioSms
from service.db import create_engine
from service.migrate import upgrade
from service.queue.worker import Worker
from service.settings import Settings
from service.types import Channel


@dataclass(frozen=True)
class Runtime:
    engine: AsyncEngine
    channels: dict[Channel, ChannelClient]
    model: Model
    worker: Worker | None


def status_callback_url(settings: Settings) -> str | None:
    if not settings.public_base_url:
        return None
    return f"{settings.public_base_url}/webhooks/twilio/status"


def create_channels(settings: Settings) -> dict[Channel, ChannelClient]:
    return {
        Channel.SMS: TwilioSms(
            settings.twilio_account_sid,
            settings.twilio_auth_token and settings.twilio_auth_tokens[0],
            settings.twilio_api_base_url,
            status_callback_url(settings),
            settings.provider_timeout_s,
        ),
        Channel.EMAIL: SendGridEmail(
            settings.sendgrid_api_key, settings.sendgrid_api_base_url, settings.provider_timeout_s
        ),
    }


@contextlib.asynccontextmanager
async def started(settings: Settings, *, with_worker: bool) -> AsyncIterator[Runtime]:
    """The process's engine, channels, model and (`with_worker`) worker; closed on exit, after
    the caller has stopped the worker."""
    engine = create_engine(settings.database_url)
    try:
        if settings.auto_migrate:
            await upgrade(engine)
        channels = create_channels(settings)
        model = create_model(settings)
        try:
            worker = Worker(engine, settings, model, channels) if with_worker else None
            yield Runtime(engine, channels, model, worker)
        finally:
            for channel in channels.values():
                await channel.close()
            await model.close()
    finally:
        await engine.dispose()
