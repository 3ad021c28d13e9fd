"""`parley serve`, `parley worker`, `parley migrate`: running Parley."""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
from collections.abc import Coroutine
from typing import Any

import uvicorn

from service.cli.profiles import profiles_or_exit
from service.db import engine_of
from service.logs import configure_logging
from service.migrate import upgrade
from service.process_memory import return_big_frees_to_the_os
from service.profiles import Profiles
from service.settings import Settings, settings_or_exit

log = logging.getLogger("parley")
OPEN_FILES_UNLIMITED = 1_048_576  # the soft limit asked for when the hard one is unlimited


def _warn_about_secrets(settings: Settings) -> None:
    if settings.parley_dev:
        if not settings.twilio_auth_tokens or not settings.sendgrid_inbound_user:
            log.warning(
                "DEV MODE: webhooks without a configured secret are accepted UNSIGNED. "
                "Never expose this server to the internet."
            )
        return
    if not settings.twilio_auth_tokens:
        log.warning("TWILIO_AUTH_TOKEN is not set: /webhooks/twilio/* refuse all traffic (403)")
    if not (settings.sendgrid_inbound_user and settings.sendgrid_inbound_password):
        log.warning(
            "SENDGRID_INBOUND_USER and SENDGRID_INBOUND_PASSWORD are not both set: "
            "/webhooks/sendgrid/inbound refuses all traffic (401)"
        )
    if not settings.public_base_url:
        log.warning(
            "PUBLIC_BASE_URL is not set: signatures are checked against the URL each request "
            "arrives on, and a conversation's StatusCallback uses the URL of its last signed "
            "webhook (behind a proxy that rewrites the host, set it)"
        )
    if not settings.openai_api_key:
        log.info("OPENAI_API_KEY is not set: the offline assistant answers")


def raise_open_files_limit() -> None:
    """Every connection is a file descriptor: under a common soft limit of 1,024, a thousand
    idle connections made every other connection fail. The soft limit goes up to the hard one
    (the operator's real bound; 1,048,576 when that is unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:  # a platform's own cap (macOS): keep the soft one
            log.info("open files stay limited to %d: %s", soft, exc)


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = {"parley_dev": True} if args.dev else {}
    settings = settings_or_exit(**overrides)
    profiles = profiles_or_exit(settings)
    configure_logging(settings)
    _warn_about_secrets(settings)
    raise_open_files_limit()
    return_big_frees_to_the_os()
    from service.web.app import create_app
    from service.web.protocol import BoundedHeadProtocol

    config = uvicorn.Config(
        create_app(settings, profiles=profiles, freeze=True),
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
        http=BoundedHeadProtocol,  # headers over 64 KiB: 431 at once
    )
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with this
    # handler in place the re-raised SIGTERM is a no-op and a clean stop exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = settings_or_exit()
    profiles = profiles_or_exit(settings)
    configure_logging(settings)
    return_big_frees_to_the_os()  # MMS items of up to 5 MB pass through a worker
    if args.metrics_port is not None:
        import prometheus_client

        prometheus_client.start_http_server(args.metrics_port)
        log.info("worker metrics on :%d/metrics", args.metrics_port)
    run_loop(_run_worker(settings, profiles))
    return 0


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop where it is installed (uvicorn's `standard` extra brings it on
    Linux and macOS), as `serve` does through uvicorn; else on asyncio's own loop. A reply job
    is mostly event-loop work (futures, callbacks, sockets): uvloop does it for less CPU."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def _run_worker(settings: Settings, profiles: Profiles) -> None:
    from service import runtime

    async with runtime.started(settings, with_worker=True, profiles=profiles, freeze=True) as ready:
        worker = ready.worker
        assert worker is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: asyncio.ensure_future(worker.stop()))
        await worker.run()


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = settings_or_exit()
    configure_logging(settings)

    async def run() -> None:
        engine = engine_of(settings)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
    print("database is at the latest revision")
    return 0
