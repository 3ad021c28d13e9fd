"""`parley conversations` and `parley forget`: the operator's commands, straight on the database
named by `DATABASE_URL` (no server needed), through the same queries as the API."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from service.channels.base import BadAddress
from service.channels.registry import build_channels
from service.db import engine_of
from service.settings import Settings, settings_or_exit
from service.store import conversations as admin

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
SUMMARY_CHARS = 32


def add_commands(commands: Any) -> None:
    listing = commands.add_parser(
        "conversations", help="the most recent conversations, with their transcript links"
    )
    listing.add_argument("--limit", type=_limit, default=20, help="how many (1-100, default 20)")
    listing.add_argument(
        "--url",
        default=None,
        help=f"base of the transcript links (default: PUBLIC_BASE_URL, else {DEFAULT_BASE_URL})",
    )
    listing.set_defaults(func=cmd_conversations)

    forget = commands.add_parser(
        "forget", help="delete every conversation of a phone number or email address"
    )
    forget.add_argument("address", help="+15550001111 or someone@example.com")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    forget.set_defaults(func=cmd_forget)


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= admin.MAX_PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be between 1 and {admin.MAX_PAGE_SIZE}")
    return value


def _database_error(settings: Settings, exc: SQLAlchemyError) -> int:
    where = make_url(settings.database_url).render_as_string(hide_password=True)
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    print(
        f"parley: cannot read the database {where}: {reason}\n"
        "(is DATABASE_URL the one the server uses, and has `parley migrate` run?)",
        file=sys.stderr,
    )
    return 1


# ---------------------------------------------------------------- parley conversations


def cmd_conversations(args: argparse.Namespace) -> int:
    settings = settings_or_exit()
    base_url = args.url or settings.public_base_url or DEFAULT_BASE_URL
    try:
        page = asyncio.run(_list(settings, args.limit))
    except SQLAlchemyError as exc:
        return _database_error(settings, exc)
    if not page.items:
        print("no conversations yet")
        return 0
    print(format_table(page.items, base_url))
    shown = len(page.items)
    if page.total > shown:
        print(f"\n{shown} of {page.total} conversations; --limit N shows more")
    return 0


async def _list(settings: Settings, limit: int) -> admin.Page:
    engine = engine_of(settings)
    try:
        return await admin.list_conversations(engine, 1, limit)
    finally:
        await engine.dispose()


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _state(overview: admin.Overview) -> str:
    flags = []
    if overview.conversation.opted_out:
        flags.append("opted out")
    if overview.conversation.paused:
        flags.append("paused")
    return ", ".join(flags) or "-"


def _remote(overview: admin.Overview) -> str:
    """The remote address, with the name the person goes by where the channel gives one."""
    conversation = overview.conversation
    name = conversation.display_name
    return f"{conversation.remote_address} ({name})" if name else conversation.remote_address


def _last_activity(moment: dt.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC ({admin.age(moment)})"


def format_table(items: Sequence[admin.Overview], base_url: str) -> str:
    header = ("ID", "CHANNEL", "REMOTE", "SUMMARY", "MSGS", "LAST ACTIVITY", "STATE", "TRANSCRIPT")
    rows = [header] + [
        (
            str(o.conversation.id),
            o.conversation.channel,
            _remote(o),
            _clip(o.conversation.summary, SUMMARY_CHARS) or "-",
            str(o.message_count),
            _last_activity(o.conversation.updated_at),
            _state(o),
            admin.transcript_url(base_url, o.conversation.conversation_url),
        )
        for o in items
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    )


# ---------------------------------------------------------------- parley forget


def cmd_forget(args: argparse.Namespace) -> int:
    settings = settings_or_exit()
    try:
        address = build_channels(settings).normalise_address(args.address)
    except BadAddress as exc:
        print(f"parley forget: {exc}", file=sys.stderr)
        return 2
    try:
        found = asyncio.run(_with_engine(settings, admin.count_address, address))
    except SQLAlchemyError as exc:
        return _database_error(settings, exc)
    if not found.conversations:
        print(f"nothing stored for {address}")
        return 0
    if not args.yes:
        print(f"{address}: {found} will be deleted for good.")
        try:
            answer = input("Delete? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    deleted = asyncio.run(_with_engine(settings, admin.forget, address))
    print(f"deleted {deleted} of {address}")
    return 0


async def _with_engine(settings: Settings, query: Any, address: str) -> admin.Deleted:
    engine = engine_of(settings)
    try:
        result: admin.Deleted = await query(engine, address)
        return result
    finally:
        await engine.dispose()
