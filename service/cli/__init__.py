"""`parley`: serve, worker, migrate, and the tools that talk to a running server."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from service.cli import admin, client, profiles
from service.cli.serve import cmd_migrate, cmd_serve, cmd_worker


def build_parser() -> argparse.ArgumentParser:
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
    admin.add_commands(commands)
    profiles.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
