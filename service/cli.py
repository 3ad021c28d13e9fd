"""`parley`: serve, worker, migrate, and the tools that talk to a running server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Sequence

import uvicorn

from service.db import create_engine
from service.logs import configure_logging
from service.migrate import upgrade
from service.settings import Settings, settings_or_exit

log = logging.getLogger("parley")


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
    if not settings.public_base_url:
        log.warning(
            "PUBLIC_BASE_URL is not set: SMS go out without a StatusCallback (no delivery "
            "status) and signatures are checked against the URL each request arrives on"
        )
    if not settings.openai_api_key:
        log.info("OPENAI_API_KEY is not set: the offline assistant answers")


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = {"parley_dev": True} if args.dev else {}
    settings = settings_or_exit(**overrides)
    configure_logging(settings)
    _warn_about_secrets(settings)
    from service.web.app import create_app
    from service.web.protocol import BoundedHeadProtocol

    config = uvicorn.Config(
        create_app(settings),
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
    configure_logging(settings)
    if args.metrics_port is not None:
        import prometheus_client

        prometheus_client.start_http_server(args.metrics_port)
        log.info("worker metrics on :%d/metrics", args.metrics_port)
    asyncio.run(_run_worker(settings))
    return 0


async def _run_worker(settings: Settings) -> None:
    from service.assistant import create_model
    from service.queue.worker import Worker
    from service.web.app import create_channels

    engine = create_engine(settings.database_url)
    if settings.auto_migrate:
        await upgrade(engine)
    channels = create_channels(settings)
    model = create_model(settings)
    worker = Worker(engine, settings, model, channels)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(worker.stop()))
    try:
        await worker.run()
    finally:
        for channel in channels.values():
            await channel.close()
        await model.close()
        await engine.dispose()


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = settings_or_exit()
    configure_logging(settings)

    async def run() -> None:
        engine = create_engine(settings.database_url)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
    print("database is at the latest revision")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from service import admin_cli, client

    parser = argparse.ArgumentParser(prog="parley", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the web app (and the reply worker)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--dev", action="store_true", help="laptop mode: accept unsigned webhooks")
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser("worker", help="run a reply worker without the web app")
    worker.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve this worker's Prometheus metrics on this port (all interfaces)",
    )
    worker.set_defaults(func=cmd_worker)

    migrate = commands.add_parser("migrate", help="alembic upgrade head on DATABASE_URL")
    migrate.set_defaults(func=cmd_migrate)

    client.add_commands(commands)
    admin_cli.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
