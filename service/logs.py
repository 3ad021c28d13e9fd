"""Logging per `LOG_LEVEL` and `LOG_FORMAT`: readable lines, or one JSON object per line."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from service.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={
                    "asctime": "time",
                    "levelname": "level",
                    "name": "logger",
                },
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Provider SDKs log whole requests (bodies, sometimes credentials) at INFO: keep them quiet.
    for noisy in (
        "twilio",
        "openai",
        "httpx",
        "httpx2",
        "aiohttp",
        "sqlalchemy.engine",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
