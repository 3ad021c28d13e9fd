"""`create_app(settings)`: the Starlette app. Its lifespan owns the engine, the inbound writer,
the channels' provider clients and (unless `EMBEDDED_WORKER=false`) the reply worker, set up
by `service.runtime`."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from service import runtime
from service.assistant import Model
from service.channels.registry import Channels, build_channels
from service.profiles import Profiles, profiles_of
from service.queue.debounce import Debounce
from service.queue.worker import Worker
from service.settings import Settings
from service.store.errors import storage_failure
from service.store.inbound import InboundWriter
from service.web import api, health, transcript, webhooks
from service.web.protocol import CUT

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass
class Services:
    """What request handlers reach through `request.app.state.services`."""

    settings: Settings
    engine: AsyncEngine
    writer: InboundWriter
    channels: Channels
    model: Model
    worker: Worker | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with runtime.started(
        settings,
        app.state.channels,
        with_worker=settings.embedded_worker,
        profiles=app.state.profiles,
        clock=app.state.clock,
        freeze=app.state.freeze,
    ) as ready:
        worker = ready.worker
        writer = InboundWriter(
            ready.engine,
            on_commit=worker.wake if worker else lambda _conversations: None,
            debounce=Debounce(settings.reply_debounce_s, settings.reply_debounce_max_s),
        )
        writer.start()
        services = Services(settings, ready.engine, writer, ready.channels, ready.model, worker)
        if worker:
            services.tasks.append(asyncio.create_task(worker.run(), name="parley-worker"))
        app.state.services = services
        try:
            yield
        finally:
            await _shutdown(services)


async def _shutdown(services: Services) -> None:
    await services.writer.stop()
    if services.worker:
        await services.worker.stop()
    # The worker's loop ends by itself once stopped; cancel only what overstays.
    if services.tasks:
        _, late = await asyncio.wait(services.tasks, timeout=5)
        for task in late:
            task.cancel()
        await asyncio.gather(*services.tasks, return_exceptions=True)


async def _storage_failure(request: Request, exc: Exception) -> Response:
    """A database that is away is a 503 with one warning line on every path (the API, the
    transcript), as on the webhooks; any other exception stays a 500 with its traceback."""
    failure = storage_failure(exc)
    if failure is None:
        raise exc
    log.warning(
        "%s %s refused: %s status=%d",
        request.method,
        request.url.path[:200],
        failure,
        failure.status,
    )
    return PlainTextResponse(f"{failure}\n", status_code=failure.status)


async def _client_gone(request: Request, exc: Exception) -> Response:
    """A client that went away before its request arrived (or was cut at `protocol`'s
    deadline): one warning line, nothing stored; the 400 reaches nobody."""
    status, why = request.scope.get("state", {}).get(
        CUT, (400, "the client went away before its request arrived")
    )
    log.warning("%s %s refused: %s status=%d", request.method, request.url.path[:200], why, status)
    return PlainTextResponse("request incomplete\n", status_code=status)


def create_app(
    settings: Settings,
    *,
    profiles: Profiles | None = None,
    clock: Callable[[], dt.datetime] | None = None,
    freeze: bool = False,
) -> Starlette:
    """The app; `PROFILES_FILE` is read now unless given (`ProfileError` when bad), so a bad
    file stops the process before it serves; `clock` judges opening hours (tests); `freeze`:
    the app is the process's own (`parley serve`: `runtime.started`)."""
    profiles = profiles or profiles_of(settings)
    channels = build_channels(settings)  # its routes are the webhooks; the lifespan uses it
    app = Starlette(
        routes=[
            Route("/healthz", health.healthz, methods=["GET"]),
            Route("/metrics", health.metrics, methods=["GET"]),
            Route("/c/{conversation_url}", transcript.page, methods=["GET"]),
            Mount("/api", app=api.create_api()),
            *webhooks.routes(channels),
        ],
        lifespan=lifespan,
        exception_handlers={
            SQLAlchemyError: _storage_failure,
            OSError: _storage_failure,
            ClientDisconnect: _client_gone,
        },
    )
    app.router.redirect_slashes = False  # never a 3xx: a path either exists or is a 404
    app.state.settings = settings
    app.state.channels = channels
    app.state.profiles = profiles
    app.state.clock = clock
    app.state.freeze = freeze
    return app
