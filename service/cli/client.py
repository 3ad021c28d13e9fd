"""Commands that talk to a running Parley the way a provider would: `parley sms`, `parley
whatsapp`, `parley email`, `parley replay`.

They send correctly shaped (and, where a secret is configured, correctly signed) webhooks over
HTTP, then watch the database named by `DATABASE_URL` for the reply, so they show the whole loop
on a laptop: `parley serve --dev` in one terminal, `parley sms "hello"` in another.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from tqdm import tqdm

from service import testing
from service.db import engine_of
from service.settings import Settings, settings_or_exit
from service.store.conversations import ReplyTo, reply_to
from service.types import Delivery, InboundState

DEFAULT_URL = "http://127.0.0.1:8000"
REPLY_WAIT_S = 60.0


def add_commands(commands: Any) -> None:
    text = commands.add_parser("sms", help="text a running server as Twilio would")
    text.add_argument("text", nargs="?", help="the message; none starts an interactive chat")
    text.add_argument("--from", dest="from_", default="+15550001111")
    text.add_argument("--to", default="+15559990000")
    text.add_argument("--url", default=DEFAULT_URL)
    text.add_argument(
        "--media",
        action="append",
        default=[],
        metavar="URL",
        help="an MMS attachment (repeatable, at most 10); the text may be empty",
    )
    text.set_defaults(func=cmd_sms)

    whatsapp = commands.add_parser("whatsapp", help="message a running server as WhatsApp would")
    whatsapp.add_argument("text")
    whatsapp.add_argument("--from", dest="from_", default="+15550001111")
    whatsapp.add_argument("--to", default="+15559990000")
    whatsapp.add_argument("--name", default="Parley CLI", help="the sender's WhatsApp ProfileName")
    whatsapp.add_argument("--url", default=DEFAULT_URL)
    whatsapp.set_defaults(func=cmd_whatsapp)

    mail = commands.add_parser("email", help="email a running server as SendGrid would")
    mail.add_argument("text")
    mail.add_argument("--from", dest="from_", default="you@example.com")
    mail.add_argument("--to", default="assistant@example.com")
    mail.add_argument("--subject", default="Hello")
    mail.add_argument("--url", default=DEFAULT_URL)
    mail.set_defaults(func=cmd_email)

    replay = commands.add_parser("replay", help="replay recorded webhook files against a server")
    replay.add_argument("files", nargs="+", type=Path)
    replay.add_argument("--url", default=DEFAULT_URL)
    replay.set_defaults(func=cmd_replay)


# ---------------------------------------------------------------- parley sms


def cmd_sms(args: argparse.Namespace) -> int:
    settings = settings_or_exit()
    if args.text is not None:
        return asyncio.run(_text_once(settings, args, args.text))
    print(f"Texting {args.to} from {args.from_} via {args.url}. Ctrl-D to quit.")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line:
            asyncio.run(_text_once(settings, args, line))


async def _text_once(settings: Settings, args: argparse.Namespace, text: str) -> int:
    sid = "SM" + secrets.token_hex(16)
    form = testing.inbound_form(text, args.from_, args.to, sid, _account_sid(settings))
    form = testing.with_media(form, args.media)
    return await _post_twilio(settings, args.url, "/webhooks/twilio/sms", form, "sms")


def cmd_whatsapp(args: argparse.Namespace) -> int:
    settings = settings_or_exit()
    sid = "SM" + secrets.token_hex(16)
    form = testing.whatsapp_form(
        args.text, args.from_, args.to, sid, _account_sid(settings), args.name
    )
    return asyncio.run(
        _post_twilio(settings, args.url, "/webhooks/twilio/whatsapp", form, "whatsapp")
    )


def _account_sid(settings: Settings) -> str:
    return settings.twilio_account_sid or "AC" + "0" * 32


async def _post_twilio(
    settings: Settings, url: str, path: str, form: dict[str, str], channel: str
) -> int:
    """Post a Twilio webhook form as Twilio would (signed where a token is configured)."""
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "User-Agent": "TwilioProxy/1.1",
    }
    if settings.twilio_auth_tokens:
        signed_url = (settings.public_base_url or url.rstrip("/")) + path
        headers["X-Twilio-Signature"] = testing.sign(
            settings.twilio_auth_tokens[0], signed_url, form
        )
    request = httpx.Request(
        "POST", url.rstrip("/") + path, content=urlencode(form), headers=headers
    )
    return await _deliver_and_wait(settings, request, channel, form["MessageSid"])


def cmd_email(args: argparse.Namespace) -> int:
    return asyncio.run(_email_once(settings_or_exit(), args))


async def _email_once(settings: Settings, args: argparse.Namespace) -> int:
    message_id = f"<cli-{secrets.token_hex(8)}@{args.from_.rpartition('@')[2] or 'localhost'}>"
    fields = testing.inbound_parse_fields(args.text, args.from_, args.to, args.subject, message_id)
    headers = {"User-Agent": "Sendlib/1.0"}
    if settings.sendgrid_inbound_user and settings.sendgrid_inbound_password:
        pair = f"{settings.sendgrid_inbound_user}:{settings.sendgrid_inbound_password}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    request = httpx.Request(
        "POST",
        args.url.rstrip("/") + "/webhooks/sendgrid/inbound",
        files={name: (None, value) for name, value in fields.items()},
        headers=headers,
    )
    return await _deliver_and_wait(settings, request, "email", message_id)


async def _deliver_and_wait(
    settings: Settings, request: httpx.Request, channel: str, provider_message_id: str
) -> int:
    """Send the webhook, then print the reply once the server has produced it."""
    async with httpx.AsyncClient(timeout=30) as http:
        try:
            response = await http.send(request)
        except httpx.HTTPError as exc:
            print(f"could not reach {request.url}: {exc}", file=sys.stderr)
            return 1
    if not response.is_success:
        print(f"server answered {response.status_code}: {response.text.strip()}", file=sys.stderr)
        return 1
    reply = await wait_for_reply(settings, channel, provider_message_id)
    print(f"parley> {reply}" if reply else "(no reply yet; see the server's log)")
    return 0


async def wait_for_reply(
    settings: Settings,
    channel: str,
    provider_message_id: str,
    timeout_s: float = REPLY_WAIT_S,
) -> str | None:
    """Watch the database for the reply to one inbound message; None if none comes."""
    engine = engine_of(settings)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            found = await reply_to(engine, channel, provider_message_id)
            if found is not None and (reply := _reply_text(found)) is not None:
                return reply
            await asyncio.sleep(0.2)
        return None
    finally:
        await engine.dispose()


def _reply_text(found: ReplyTo) -> str | None:
    if found.status == InboundState.RECEIVED.value:
        return None
    if found.status != InboundState.ANSWERED.value:
        return f"(no reply: message {found.status}{': ' + found.error if found.error else ''})"
    if not found.parts:
        return None
    text = "\n".join(found.parts)
    if found.subject:
        text = f"[{found.subject}] {text}"
    return text + (
        "  [not sent: no provider credentials]"
        if found.part_status == Delivery.NOT_SENT.value
        else ""
    )


# ---------------------------------------------------------------- parley replay


def load_recording(path: Path) -> tuple[str, str, dict[str, str], bytes]:
    """A recorded webhook (SPEC §7): method, path, headers, body."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if "body_b64" in data:
        body = base64.b64decode(data["body_b64"])
    else:
        body = str(data.get("body", "")).encode("utf-8")
    return (
        str(data.get("method", "POST")),
        str(data["path"]),
        dict(data.get("headers", {})),
        body,
    )


def _replayable(headers: dict[str, str]) -> dict[str, str]:
    """Hop-by-hop and length headers are the new connection's business."""
    drop = {"host", "content-length", "connection", "transfer-encoding"}
    return {k: v for k, v in headers.items() if k.lower() not in drop}


def cmd_replay(args: argparse.Namespace) -> int:
    return asyncio.run(replay(args.url, args.files))


async def replay(url: str, files: Sequence[Path]) -> int:
    counts = {"sent": 0, "answered 2xx": 0, "refused": 0, "failed": 0}
    async with httpx.AsyncClient(timeout=30, follow_redirects=False) as http:
        for path in tqdm(files, unit="request", desc="replaying"):
            counts["sent"] += 1
            try:
                method, target, headers, body = load_recording(path)
                response = await http.request(
                    method,
                    url.rstrip("/") + target,
                    headers=_replayable(headers),
                    content=body,
                )
            except (OSError, ValueError, KeyError, httpx.HTTPError) as exc:
                counts["failed"] += 1
                tqdm.write(f"{path}: {exc}")
                continue
            if response.is_success:
                counts["answered 2xx"] += 1
            else:
                counts["refused"] += 1
                tqdm.write(f"{path}: {response.status_code} {response.text.strip()[:200]}")
    print(", ".join(f"{name}: {count}" for name, count in counts.items()))
    return 0 if counts["failed"] == 0 else 1
