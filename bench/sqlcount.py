"""`parley` with SQLAlchemy's events counted, for the profile: how many transactions, pool
checkouts and statements (by kind and table) the process ran. Nothing in service/ changes:
the listeners are attached to SQLAlchemy's Engine and Pool classes before Parley starts.

    BENCH_SQLCOUNT_OUT=counts.json python -m bench.sqlcount serve --port 8000

The counts are written as JSON when the process exits (SIGTERM included).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
from collections import Counter
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

statements: Counter[str] = Counter()
events: Counter[str] = Counter()

_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+\"?(\w+)", re.IGNORECASE)


def kind(statement: str) -> str:
    """`SELECT message`, `UPDATE reply_job`, `BEGIN IMMEDIATE`...: verb and first table."""
    words = statement.split()
    if not words:
        return "(empty)"
    verb = words[0].upper()
    if verb in ("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA", "SAVEPOINT", "RELEASE"):
        return " ".join(words[:2]).upper() if verb == "BEGIN" else verb
    table = _TABLE.search(statement)
    return f"{verb} {table.group(1) if table else '?'}"


@event.listens_for(Engine, "before_cursor_execute")
def _statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
    statements[kind(statement)] += 1
    events["statements"] += 1


@event.listens_for(Engine, "begin")
def _begin(_conn: Any) -> None:
    events["transactions (begin)"] += 1


@event.listens_for(Engine, "commit")
def _commit(_conn: Any) -> None:
    events["commits"] += 1


@event.listens_for(Engine, "rollback")
def _rollback(_conn: Any) -> None:
    events["rollbacks"] += 1


@event.listens_for(Pool, "checkout")
def _checkout(*_: Any) -> None:
    events["pool checkouts"] += 1


@event.listens_for(Pool, "connect")
def _connect(*_: Any) -> None:
    events["new DB connections"] += 1


def _dump() -> None:
    out = os.environ.get("BENCH_SQLCOUNT_OUT", "sqlcount.json")
    with open(out, "w") as file:
        json.dump({"events": events, "statements": statements}, file, indent=1)


atexit.register(_dump)

if __name__ == "__main__":
    from service.cli import main

    sys.exit(main(sys.argv[1:]))
