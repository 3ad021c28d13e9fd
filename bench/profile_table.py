"""Tables of where CPU went, from a py-spy raw profile (`py-spy record --format raw`).

    python bench/profile_table.py profile.txt [--replies N] [--rate 100]

Each line of the raw format is one distinct stack, root first, `;`-separated, then the number
of samples that saw it; py-spy samples only threads that are running, so samples ~ CPU time
(`--rate` samples a second per thread). Three tables, as markdown:

1. by layer: each sample goes to the innermost Python frame's library (SQLAlchemy split into
   compilation, statement building, ORM, engine, pool, dialect, asyncio/greenlet), except
   that native SQLite frames under it count as SQLite. The rows add up to 100 %.
2. inclusive: share of samples with any frame in a library or a named kind of work
   (overlapping rows).
3. by Parley step: the innermost `service/` frame; samples without one are split by what
   they run (aiosqlite's threads, SQLAlchemy in greenlets, the HTTP clients' callbacks);
4. where waiting threads waited (left out of 1-3).

With `--replies`, milliseconds of CPU per reply are shown next to each share (scaled to
`--cpu-ms`, the CPU per reply /proc measured, when given).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# py-spy's --native mode samples threads that are waiting, too: a sample whose innermost
# named native frame is one of these blocking calls is off-CPU and left out.
BLOCKING = {
    "clock_nanosleep", "nanosleep", "usleep",  # SQLite's busy handler waiting for the lock
    "PyThread_acquire_lock_timed", "pthread_cond_timedwait", "pthread_cond_wait",
    "sem_wait", "sem_timedwait", "__futex_abstimed_wait_common",  # queues, locks
    "epoll_wait", "epoll_pwait", "select", "poll", "accept", "accept4",  # idle event loops
    "fdatasync", "fsync",  # disk
}  # fmt: skip
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Frame:
    func: str
    file: str

    @property
    def python(self) -> bool:
        return self.file.endswith(".py")


def waiting(frames: list[Frame]) -> str | None:
    """The blocking call this stack is waiting in, if any."""
    named = [f.func for f in frames if not f.func.startswith("0x")]
    return named[-1] if named and named[-1] in BLOCKING else None


def wait_place(frames: list[Frame], call: str) -> str:
    """What a waiting thread waits for, in words where it is known."""
    funcs = {f.func for f in frames}
    if "sqlite3InvokeBusyHandler" in funcs:
        return "SQLite busy handler: a connection sleeping until the write lock is free"
    pythons = [f for f in frames if f.python]
    where = f"{pythons[-1].file} `{pythons[-1].func}`" if pythons else "native"
    if "aiosqlite/core.py" in where:
        return f"aiosqlite thread idle, waiting for its next call ({call})"
    if "concurrent/futures/thread.py" in where:
        return f"thread pool worker idle ({call})"
    if call.startswith("epoll"):
        return "event loop idle in epoll (nothing ready)"
    return f"{where} ({call})"


def parse(path: Path) -> Iterable[tuple[list[Frame], int]]:
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for text in stack.split(";"):
            match = FRAME.match(text)
            frames.append(Frame(match["func"], match["file"]) if match else Frame(text, ""))
        yield frames, int(count)


# Innermost Python frame's file -> layer; the first matching prefix wins.
LAYERS = [
    ("sqlalchemy/sql/compiler.py", "SQLAlchemy: SQL compilation"),
    ("sqlalchemy/sql/cache_key.py", "SQLAlchemy: statement cache keys"),
    ("sqlalchemy/sql/traversals.py", "SQLAlchemy: statement cache keys"),
    ("sqlalchemy/sql/", "SQLAlchemy: building statements (sql/)"),
    ("sqlalchemy/orm/", "SQLAlchemy: ORM (session, unit of work, loading)"),
    ("sqlalchemy/engine/", "SQLAlchemy: engine (execute, results, transactions)"),
    ("sqlalchemy/pool/", "SQLAlchemy: connection pool"),
    ("sqlalchemy/dialects/", "SQLAlchemy: dialect + async driver adapter"),
    ("sqlalchemy/ext/asyncio/", "SQLAlchemy: asyncio layer (greenlet hops)"),
    ("sqlalchemy/util/_concurrency", "SQLAlchemy: asyncio layer (greenlet hops)"),
    ("sqlalchemy/util/concurrency.py", "SQLAlchemy: asyncio layer (greenlet hops)"),
    ("sqlalchemy/connectors/asyncio.py", "SQLAlchemy: dialect + async driver adapter"),
    ("sqlalchemy/event/", "SQLAlchemy: event dispatch"),
    ("sqlalchemy/util/", "SQLAlchemy: util (memoization, collections)"),
    ("sqlalchemy/", "SQLAlchemy: other"),
    ("aiosqlite/", "aiosqlite: thread hop (queue, futures, thread loop)"),
    ("openai/", "openai SDK (request building, parsing, pydantic models)"),
    ("httpx", "httpx/httpcore (openai's transport)"),
    ("httpcore", "httpx/httpcore (openai's transport)"),
    ("h11/", "httpx/httpcore (openai's transport)"),
    ("anyio/", "httpx/httpcore (openai's transport)"),
    ("twilio/", "twilio SDK"),
    ("aiohttp", "aiohttp (twilio's transport)"),
    ("multidict/", "aiohttp (twilio's transport)"),
    ("yarl/", "aiohttp (twilio's transport)"),
    ("json/", "json"),
    ("logging/", "logging"),
    ("pythonjsonlogger/", "logging"),
    ("pydantic", "pydantic"),
    ("uvicorn/", "HTTP server (uvicorn, starlette)"),
    ("starlette/", "HTTP server (uvicorn, starlette)"),
    ("prometheus_client/", "metrics (prometheus_client)"),
    ("asyncio/", "event loop (asyncio, uvloop)"),
    ("uvloop/", "event loop (asyncio, uvloop)"),
    ("threading.py", "threads (threading, queue, concurrent.futures)"),
    ("queue.py", "threads (threading, queue, concurrent.futures)"),
    ("concurrent/", "threads (threading, queue, concurrent.futures)"),
    ("service/", "Parley's own code"),
]
SQLITE_NATIVE = ("sqlite3", "_sqlite")


def _is_sqlite_native(frame: Frame) -> bool:
    return not frame.python and any(s in frame.file.lower() for s in SQLITE_NATIVE)


def layer(frames: list[Frame]) -> str:
    pythons = [i for i, f in enumerate(frames) if f.python]
    if not pythons:
        return "native only (interpreter, GC, libc)"
    innermost = pythons[-1]
    if any(_is_sqlite_native(f) for f in frames[innermost + 1 :]):
        return "SQLite C library (in aiosqlite's threads)"
    file = frames[innermost].file
    for prefix, name in LAYERS:
        if prefix in file:
            return name
    return f"other: {file.split('/')[0]}"


# Inclusive tags: (name, test on one frame).
TAGS = [
    ("SQLAlchemy, anything under it", lambda f: "sqlalchemy/" in f.file),
    ("  SQL compilation (sql/compiler.py)", lambda f: "sqlalchemy/sql/compiler.py" in f.file),
    ("  statement cache keys", lambda f: "sqlalchemy/sql/cache_key.py" in f.file),
    ("  ORM (sqlalchemy/orm)", lambda f: "sqlalchemy/orm/" in f.file),
    ("aiosqlite + SQLite (both sides of the thread hop)", lambda f: "aiosqlite/" in f.file),
    ("SQLite C library", _is_sqlite_native),
    ("openai SDK, anything under it", lambda f: "openai/" in f.file),
    (
        "  openai: building the request / client copies",
        lambda f: (
            "openai/" in f.file
            and any(k in f.func for k in ("_build_request", "copy", "with_options", "_prepare"))
        ),
    ),
    ("  openai: parsing the response (pydantic)", lambda f: "openai/_models.py" in f.file),
    ("twilio SDK, anything under it", lambda f: "twilio/" in f.file),
    ("aiohttp (twilio's transport)", lambda f: "aiohttp/" in f.file),
    ("httpx/httpcore (openai's transport)", lambda f: "httpx" in f.file or "httpcore" in f.file),
    ("json (encode/decode)", lambda f: f.file.startswith("json/") or "_json.c" in f.file),
    ("logging", lambda f: f.file.startswith("logging/")),
    ("pydantic", lambda f: "pydantic" in f.file),
    (
        "HTTP server (uvicorn protocols, starlette)",
        lambda f: "uvicorn/protocols" in f.file or "starlette/" in f.file,
    ),
    ("metrics (prometheus_client)", lambda f: "prometheus_client/" in f.file),
]


ENTRY_POINTS = ("service/cli.py", "service/__main__.py")  # under every main-thread stack


def step(frames: list[Frame]) -> str:
    """The innermost Parley frame. SQLAlchemy runs its synchronous core in greenlets and
    ends `async with session.begin()` blocks in a shielded task of their own: neither stack
    leads back to the Parley call that caused it, so those samples get rows of their own."""
    for frame in reversed(frames):
        if frame.file.startswith("service/") and frame.file not in ENTRY_POINTS:
            return f"{frame.file.removeprefix('service/')} `{frame.func}`"
    files = " ".join(f.file for f in frames)
    if "aiosqlite/core.py" in files and "threading.py" in files:
        return "(aiosqlite's threads: SQLite calls of any step)"
    if "sqlalchemy/" in files:
        return "(SQLAlchemy in greenlets / shielded session exits: any step)"
    if "aiohttp/" in files:
        return "(aiohttp callbacks: Twilio sends)"
    if "httpcore" in files or "anyio/" in files or "httpx" in files:
        return "(httpx/anyio callbacks: model calls)"
    return "(event loop, callbacks, other: no Parley frame)"


@dataclass
class Tables:
    total: int  # on-CPU samples
    waiting: Counter[str]  # off-CPU samples, by the call they wait in
    waits: Counter[str]  # off-CPU samples, by what they wait for
    layers: Counter[str]
    tags: Counter[str]
    steps: Counter[str]


def tabulate(path: Path) -> Tables:
    layers: Counter[str] = Counter()
    tags: Counter[str] = Counter()
    steps: Counter[str] = Counter()
    blocked: Counter[str] = Counter()
    waits: Counter[str] = Counter()
    total = 0
    for frames, count in parse(path):
        if call := waiting(frames):
            blocked[call] += count
            waits[wait_place(frames, call)] += count
            continue
        total += count
        layers[layer(frames)] += count
        steps[step(frames)] += count
        for name, test in TAGS:
            if any(test(f) for f in frames):
                tags[name] += count
    return Tables(total, blocked, waits, layers, tags, steps)


def markdown(
    tables: Tables, replies: int | None, rate: float, cpu_ms_each: float | None = None
) -> str:
    """With `cpu_ms_each` (CPU per reply by /proc), a share's milliseconds are that share of
    it: py-spy also samples threads that are runnable but waiting for a core, so on a busy
    machine its sample count overstates CPU time; its shares are what it measures well."""
    sampled_ms = tables.total / rate / replies * 1000 if replies else 0.0
    per_reply = cpu_ms_each or sampled_ms

    def row(name: str, samples: int) -> str:
        share = samples / tables.total if tables.total else 0.0
        per = f" {share * per_reply:.2f} |" if replies else ""
        return f"| {name} | {share * 100:.1f} % |{per}"

    header = "| where | share |" + (" ms per reply |" if replies else "")
    rule = "|---|---:|" + ("---:|" if replies else "")
    waits = ", ".join(f"{k} {v}" for k, v in tables.waiting.most_common(4))
    out = [
        f"On-CPU samples: {tables.total} at {rate:g} Hz ({tables.total / rate:.1f} s); "
        f"{sum(tables.waiting.values())} samples of waiting threads left out ({waits})."
    ]
    if replies:
        out[0] += f" Replies: {replies}; sampled {sampled_ms:.1f} ms each"
        out[0] += f", /proc {cpu_ms_each:.1f} ms each." if cpu_ms_each else "."
    sections = [
        ("By layer (innermost Python frame; adds up to 100 %)", tables.layers.most_common()),
        (
            "Inclusive (a sample counts in every row it has a frame in)",
            [(name, tables.tags[name]) for name, _ in TAGS],
        ),
        ("By Parley step (innermost service/ frame)", tables.steps.most_common(25)),
    ]
    for title, items in sections:
        out += ["", f"**{title}**", "", header, rule]
        out += [row(name, samples) for name, samples in items]
    waited = sum(tables.waits.values())
    out += ["", "**Where threads waited (off-CPU samples, every thread)**", ""]
    out += ["| waiting in | samples | thread-seconds |", "|---|---:|---:|"]
    out += [f"| {k} | {v} | {v / rate:.1f} |" for k, v in tables.waits.most_common(8)]
    out.append(f"| all | {waited} | {waited / rate:.1f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--replies", type=int)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--cpu-ms", type=float, help="CPU per reply by /proc, to scale with")
    args = parser.parse_args()
    print(markdown(tabulate(args.profile), args.replies, args.rate, args.cpu_ms))


if __name__ == "__main__":
    main()
