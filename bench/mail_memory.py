"""Memory of a real `parley serve` while near-limit mails arrive at once: its RSS (and its
extraction children's) idle and at peak, per mail in flight, and whether every mail was stored.

    python bench/mail_memory.py [--root CHECKOUT] [--mails 10] [--mb 28] [--mode raw|parsed]

Each mail carries one attachment of `--mb` MB (base64 in raw mode, a file part in parsed mode)
under `MAX_EMAIL_BYTES` (30 MB): what anyone can make SendGrid post by mailing the address
(SendGrid's own limit is 30 MB a mail). `--root` serves another checkout's `service`, for
before/after figures. `/healthz` is polled meanwhile; its worst latency is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.burst import rss_kib  # noqa: E402
from tests.email_posts import (  # noqa: E402
    INBOUND,
    HealthzProbe,
    raw_post,
    request_of,
    server_env,
    with_fields,
)
from tests.fakes import FakeProviders  # noqa: E402
from tests.fixtures.make_sendgrid_fixtures import Field  # noqa: E402
from tests.processes import serving, stop  # noqa: E402


def family_rss_kib(pid: int) -> tuple[int, int]:
    """RSS of the process and of its children (the extraction processes), in KiB."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children += (task / "children").read_text().split()
    own = rss_kib(pid)
    rest = 0
    for child in children:
        with contextlib.suppress(OSError, RuntimeError):  # gone meanwhile
            rest += rss_kib(int(child))
    return own, rest


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.peak_children = pid, 0, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            own, children = family_rss_kib(self.pid)
            self.peak = max(self.peak, own)
            self.peak_children = max(self.peak_children, children)
            self._done.wait(0.01)

    def stop(self) -> None:
        self._done.set()
        self.join()


def big_mail(mode: str, index: int, size_mb: int, run: str) -> list[Field]:
    size = size_mb * 1024 * 1024
    payload = os.urandom(size if mode == "parsed" else size * 3 // 4)  # base64 grows it 4/3
    message_id = f"<mem-{run}-{index}@example.com>"
    if mode == "parsed":
        fields = with_fields("gmail_first", text=f"Hello number {index}, see attached.\n")
        headers = next(f for f in fields if f.name == "headers").value.decode()
        headers = "\r\n".join(
            line for line in headers.split("\r\n") if not line.lower().startswith("message-id")
        )
        return [
            *(f for f in fields if f.name != "headers"),
            Field("headers", f"Message-ID: {message_id}\r\n{headers}".encode()),
            Field("attachment1", payload, filename="photo.jpg", ctype="image/jpeg"),
        ]
    encoded = base64.encodebytes(payload)
    body = (
        b'--b1\r\nContent-Type: text/plain; charset="utf-8"\r\n\r\n'
        + f"Hello number {index}, see attached.\r\n".encode()
        + b"--b1\r\nContent-Type: image/jpeg\r\nContent-Transfer-Encoding: base64\r\n"
        + b'Content-Disposition: attachment; filename="photo.jpg"\r\n\r\n'
        + encoded
        + b"--b1--\r\n"
    )
    return raw_post(message_id, {"Content-Type": 'multipart/mixed; boundary="b1"'}, body)


async def post_all(base_url: str, requests: list[tuple[dict[str, str], bytes]]) -> list[int]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        answers = await asyncio.gather(
            *(client.post(INBOUND, headers=h, content=b) for h, b in requests)
        )
    return [a.status_code for a in answers]


def post_in_process(base_url: str, requests: list[tuple[dict[str, str], bytes]]) -> list[int]:
    return asyncio.run(post_all(base_url, requests))


def stored_mails(database: Path, run: str) -> tuple[int, int]:
    """Mails stored, and how many of them with their text (not a fallback with none)."""
    with sqlite3.connect(database) as db:
        stored, with_text = db.execute(
            "select count(*), sum(body like 'Hello number%') from message"
            " where provider_message_id like ?",
            (f"<mem-{run}-%",),
        ).fetchone()
    return int(stored), int(with_text or 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose service to run")
    parser.add_argument("--mails", type=int, default=10, help="mails posted at once")
    parser.add_argument("--mb", type=int, default=28, help="attachment size of each, in MB")
    parser.add_argument("--mode", choices=("raw", "parsed"), default="raw")
    parser.add_argument("--log", type=Path, help="keep the server's log here")
    args = parser.parse_args()
    run = f"{time.time_ns() % 10**9}"
    requests = [request_of(big_mail(args.mode, i, args.mb, run)) for i in range(args.mails)]
    body_mb = sum(len(b) for _, b in requests) / args.mails / 2**20
    with tempfile.TemporaryDirectory() as scratch, FakeProviders() as fakes:
        database = Path(scratch) / "bench.db"
        env = server_env(
            f"sqlite+aiosqlite:///{database}",
            fakes.base_url,
            **dict(e.split("=", 1) for e in os.environ.get("BENCH_ENV", "").split()),
        )
        env["PYTHONPATH"] = str(args.root.resolve())
        env["PATH"] = os.environ.get("PATH", "")
        with serving(env, Path(scratch)) as (port, process):
            base_url = f"http://127.0.0.1:{port}"
            time.sleep(1.0)
            idle, idle_children = family_rss_kib(process.pid)
            sampler, probe = RssSampler(process.pid), HealthzProbe(base_url)
            sampler.start()
            probe.start()
            start = time.monotonic()
            with ProcessPoolExecutor(1) as poster:  # its own GIL: the probe measures the server
                statuses = poster.submit(post_in_process, base_url, requests).result()
            seconds = time.monotonic() - start
            probe.stop()
            sampler.stop()
            stored, with_text = stored_mails(database, run)
            time.sleep(2.0)
            after, after_children = family_rss_kib(process.pid)
            stop(process)
            if args.log:
                shutil.copy(Path(scratch) / "serve.log", args.log)
    grown = (sampler.peak - idle) / 1024
    print(f"{args.mails} {args.mode} mails of {body_mb:.1f} MB posted at once, in {seconds:.1f} s")
    print(
        f"answers: {sorted(statuses)}; stored: {stored} of {args.mails}, "
        f"{with_text} with their text"
    )
    print(
        f"serve RSS idle {idle / 1024:.1f} MiB, peak {sampler.peak / 1024:.1f} MiB "
        f"(+{grown:.1f} MiB, {grown / args.mails:.1f} MiB a mail in flight); extraction "
        f"children idle {idle_children / 1024:.1f}, peak {sampler.peak_children / 1024:.1f} MiB"
    )
    print(
        f"2 s later: serve {after / 1024:.1f} MiB, extraction children "
        f"{after_children / 1024:.1f} MiB"
    )
    print(f"/healthz worst {max(probe.during(start, start + seconds) or [0.0]) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
