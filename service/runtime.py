"""What a Parley process runs on, set up and torn down once: the engine (migrated when
`AUTO_MIGRATE`), the provider clients, the model and, when wanted, the reply worker. The web
app's lifespan and `parley worker` both use `started`."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from service.assistant import Model, create_model
from service.channels.registry import Channels, build_channels
from service.collector import freeze_for_good
from service.db import engine_of
from service.group_commit import group_commit
from service.migrate import upgrade
from service.profiles import Profiles, profiles_of
from service.queue.worker import Worker
from service.reply.flow import ReplyContext
from service.settings import Settings


@dataclass(frozen=True)
class Runtime:
    engine: AsyncEngine
    channels: Channels
    model: Model
    worker: Worker | None


@contextlib.asynccontextmanager
async def started(
    settings: Settings,
    channels: Channels | None = None,
    *,
    with_worker: bool,
    profiles: Profiles | None = None,
    clock: Callable[[], dt.datetime] | None = None,
    freeze: bool = False,
) -> AsyncIterator[Runtime]:
    """The process's engine, channels (the web app passes the registry whose routes it
    mounted), model and (`with_worker`) worker; closed on exit, after the caller has stopped
    the worker. `PROFILES_FILE` is read here unless the caller read it (`ProfileError` when
    bad); `clock` is what opening hours are judged by (tests pass a fake one); `freeze`: a
    process of its own (`parley serve`, `parley worker`) keeps what it started with out of the
    garbage collector's full collections (`collector`)."""
    profiles = profiles or profiles_of(settings)
    engine = engine_of(settings)
    try:
        if settings.auto_migrate:
            await upgrade(engine)
        channels = channels if channels is not None else build_channels(settings)
        model = create_model(settings)
        try:
            context = ReplyContext(engine, settings, model, channels, profiles)
            if clock is not None:
                context = dataclasses.replace(context, clock=clock)
            worker = Worker(context) if with_worker else None
            if freeze:
                freeze_for_good()
            yield Runtime(engine, channels, model, worker)
        finally:
            await channels.close()
            await model.close()
    finally:
        await group_commit(engine).drained()  # what stopped jobs handed in, written first
        await engine.dispose()
