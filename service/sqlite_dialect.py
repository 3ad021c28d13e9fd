"""SQLAlchemy's aiosqlite dialect, with a statement costing one trip to SQLite's thread.

aiosqlite runs a connection's SQLite calls in a thread of its own: every call is a future, a
put on the thread's queue and a wake-up of the event loop when it is done. SQLAlchemy's adapter
makes four such calls a statement (open a cursor, execute, fetch the rows, close the cursor),
each behind a greenlet switch. Profiled under load (bench/profile_replies.py) those trips were
the largest single cost of a reply job: 2.8 ms of its 11 ms of CPU.

Here a statement is one function run in aiosqlite's thread, which opens the cursor, executes,
fetches everything and closes it, and hands back the rows, the description, the row count and
the last row id together. Everything else (connections, transactions, isolation levels, errors,
server-side cursors, which send a pending BEGIN on a trip of its own first) is the stock
dialect's. `db.create_engine` picks this dialect for every `sqlite+aiosqlite` URL, so the
configured URL stays the one SPEC.md documents.

Inline transactions. Even one trip a statement was, profiled again, most of what was left:
each trip is a future, a put on the thread's queue and a wake-up of the event loop from
another thread, and on a virtual machine whose other vCPU is idle that wake-up costs more than
the statement (9.0 ms of CPU a reply unpinned, 6.0 pinned to one CPU). A transaction begun with
the `db.INLINE` execution option (`db.inline(engine)`: the reply jobs' units, the webhooks'
batches, the lease renewals; each a few small statements on indexes) runs its statements on
the event loop's own thread instead (4.6 ms a reply unpinned, 4.0 pinned, in that first step;
README "Performance" has the figures since). What could make such a statement slow is kept
off the loop:

- waiting for a lock: only a transaction's first statement can (a `BEGIN IMMEDIATE` queuing
  for the write lock, or a reader's first read meeting a WAL recovery); it runs with the busy
  timeout at zero, and if SQLite answers "busy" it is run again in the thread, which waits;
- a checkpoint (the WAL copied into the database file, with a sync): SQLite would run one in
  whichever COMMIT finds the WAL past 1,000 pages. Here the connections' automatic checkpoint
  is off (`db`), and the commit of every `CHECKPOINT_EVERY`-th write transaction makes its trip
  to the thread and runs a PASSIVE checkpoint there, after the COMMIT (what SQLite's automatic
  one is, counted in transactions instead of pages; one that readers kept from copying the
  whole WAL is tried again `CHECKPOINT_RETRY` transactions later, and `journal_size_limit`
  cuts a WAL grown past 64 MiB back when it starts over). Every other COMMIT, a read's
  included, runs on the loop's thread when its transaction was inline: in WAL mode with
  `synchronous=NORMAL` it writes the transaction's pages to the WAL and syncs nothing. So an
  inline transaction never yields to the event loop while it holds the one writer connection: other
  writers never wait for the loop's other work to run first (measured at 100 webhooks a second:
  each write transaction held the connection ~5 ms, the loop's other work mostly, and the
  writer queue, not the CPU, set the webhook-to-reply latency);
- statements that may scan (the claims' reads of the whole queue; the API's listings,
  `/metrics`' counts, a cascading delete) are not in inline transactions: they keep their trip
  (a claim then takes what it read in an inline write).

It relies on one private method of aiosqlite, `Connection._execute(fn, *args)` (queue `fn` for
the connection's thread and await its result), and on its `_conn`, the `sqlite3.Connection`
(opened with `check_same_thread=False`), present and unchanged from aiosqlite 0.17 to 0.22;
their absence would fail every SQLite test at once, not quietly.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
from typing import Any

from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
    SQLiteDialect_aiosqlite,
)
from sqlalchemy.util.concurrency import await_

DRIVER = "parley_aiosqlite"  # the URL's driver name that selects this dialect
CHECKPOINT_EVERY = 64  # write transactions between checkpoints (SQLite's own: 1,000 WAL pages)
CHECKPOINT_RETRY = 8  # ... after one that readers kept from copying the whole WAL
log = logging.getLogger(__name__)

_Outcome = tuple[Any, list[Any], int, int | None]  # description, rows, rowcount, lastrowid


def _run_statement(
    raw: sqlite3.Connection, begin: str | None, operation: str, parameters: Any
) -> _Outcome:
    """In aiosqlite's thread: the transaction's BEGIN when it is the first statement, then the
    whole statement, cursor opened and closed."""
    if begin is not None:
        raw.execute(begin)
    cursor = raw.cursor()
    try:
        cursor.execute(operation, parameters if parameters is not None else ())
        description = cursor.description
        rows = cursor.fetchall() if description else []
        return description, rows, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


def _run_many(
    raw: sqlite3.Connection, begin: str | None, operation: str, seq_of_parameters: Any
) -> _Outcome:
    if begin is not None:
        raw.execute(begin)
    cursor = raw.cursor()
    try:
        cursor.executemany(operation, seq_of_parameters)
        return None, [], cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


def _run_inline(
    statement: Any,
    raw: sqlite3.Connection,
    busy_timeout_ms: int,
    begin: str | None,
    operation: str,
    parameters: Any,
) -> _Outcome | None:
    """On the event loop's thread: `statement`'s outcome, or None when it is the transaction's
    first and SQLite would have it wait for a lock (nothing of it ran: the thread waits)."""
    if begin is None:
        return statement(raw, None, operation, parameters)  # type: ignore[no-any-return]
    raw.execute("PRAGMA busy_timeout=0")
    try:
        return statement(raw, begin, operation, parameters)  # type: ignore[no-any-return]
    except sqlite3.OperationalError as error:
        # Not every OperationalError carries a code (a column that is not UTF-8 has none).
        if getattr(error, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
            raise
        return None
    finally:
        raw.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")


def _commit_and_checkpoint(raw: sqlite3.Connection) -> bool:
    """In aiosqlite's thread: COMMIT, then what SQLite's automatic checkpoint would do (PASSIVE:
    copy what no reader still needs, never wait for one). True when it copied the whole WAL,
    which the next write then starts over. A failed checkpoint is logged, not raised: the
    COMMIT before it stands."""
    raw.commit()
    try:
        _busy, frames, copied = raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except sqlite3.Error:
        log.warning("SQLite checkpoint failed; the next one is tried soon", exc_info=True)
        return False
    return bool(copied >= frames)


class OneTripCursor(AsyncAdapt_aiosqlite_cursor):
    """A cursor whose statements each make one trip to the connection's thread; it holds the
    results, not an aiosqlite cursor."""

    __slots__ = ("_description", "_lastrowid", "_rowcount")

    _adapt_connection: OneTripConnection

    def __init__(self, adapt_connection: OneTripConnection) -> None:
        # Not the base class's __init__: that one opens an aiosqlite cursor (a trip).
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._soft_closed_memoized: Any = {}
        self._rows: collections.deque[Any] = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> Any:
        return self._lastrowid

    @property
    def arraysize(self) -> int:
        return 1  # sqlite3's default; the rows are all fetched already

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        pass

    async def _async_soft_close(self) -> None:
        return None  # nothing is open in SQLite's thread between statements

    def close(self) -> None:
        self._rows.clear()

    def execute(self, operation: Any, parameters: Any = None) -> Any:
        self._take(self._trip(_run_statement, operation, parameters))

    def executemany(self, operation: Any, seq_of_parameters: Any) -> Any:
        self._take(self._trip(_run_many, operation, seq_of_parameters))

    def _trip(self, statement: Any, operation: Any, parameters: Any) -> _Outcome:
        try:
            return await_(self._run(statement, operation, parameters))
        except Exception as error:  # noqa: BLE001  translated and raised, as the stock cursor does
            self._adapt_connection._handle_exception(error)

    async def _run(self, statement: Any, operation: Any, parameters: Any) -> _Outcome:
        """The statement's outcome: run here in an inline transaction (unless SQLite would
        have it wait for a lock), else on one trip to aiosqlite's thread."""
        adapt_connection = self._adapt_connection
        async with adapt_connection._execute_mutex:
            begin = adapt_connection.take_begin()
            connection = self._connection
            raw = connection._conn
            if adapt_connection.inline:
                busy_timeout_ms = adapt_connection.busy_timeout_ms()
                outcome = _run_inline(statement, raw, busy_timeout_ms, begin, operation, parameters)
                if outcome is not None:
                    return outcome
                if raw.in_transaction:  # a reader's BEGIN DEFERRED ran; its first read waits
                    begin = None
            return await connection._execute(  # type: ignore[no-any-return]
                statement, raw, begin, operation, parameters
            )

    def _take(self, outcome: _Outcome) -> None:
        self._description, rows, self._rowcount, self._lastrowid = outcome
        self._rows = collections.deque(rows)


class OneTripConnection(AsyncAdapt_aiosqlite_connection):
    """The stock connection adapter with one-trip cursors, and a transaction's BEGIN that
    travels with its first statement (`begin_with_next_statement`): a transaction that runs no
    statement then costs no trip at all, and one that does saves one. An inline transaction's
    statements make no trip (the module's docstring)."""

    __slots__ = (
        "_begin",
        "_busy_timeout_ms",
        "_checkpoint_after",
        "_writes",
        "_writes_since_checkpoint",
        "inline",
    )
    _cursor_cls = OneTripCursor  # type: ignore[assignment]  # a subclass; mypy reads it as exact

    def __init__(self, dbapi: Any, connection: Any) -> None:
        super().__init__(dbapi, connection)
        self._begin: str | None = None
        self._busy_timeout_ms: int | None = None
        self._writes = True
        self._writes_since_checkpoint = 0
        self._checkpoint_after = CHECKPOINT_EVERY
        self.inline = False

    def begin_with_next_statement(
        self, begin: str, *, inline: bool = False, writes: bool = True
    ) -> None:
        """The next transaction begins with `begin`, sent with its first statement; `inline`:
        its statements, and its COMMIT unless a checkpoint is due, run on the event loop's
        thread; `writes`: False for a transaction that only reads (it never checkpoints)."""
        self._begin = begin
        self.inline = inline
        self._writes = writes

    def cursor(self, server_side: bool = False) -> Any:
        if server_side and (begin := self.take_begin()) is not None:
            # The stock streaming cursor cannot carry the BEGIN: it makes its own trip first.
            self._in_thread(self._connection._conn.execute, begin)
        return super().cursor(server_side=server_side)

    def busy_timeout_ms(self) -> int:
        """The connection's busy timeout (set when it connected), restored after an inline
        transaction's first statement, which runs without one."""
        if self._busy_timeout_ms is None:
            (timeout,) = self._connection._conn.execute("PRAGMA busy_timeout").fetchone()
            self._busy_timeout_ms = int(timeout)
        return self._busy_timeout_ms

    def take_begin(self) -> str | None:
        begin, self._begin = self._begin, None
        return begin

    def commit(self) -> None:
        inline, self.inline = self.inline, False
        if self.take_begin() is not None or not self._connection._connection:
            return  # nothing ran; or the connection is closed (the stock adapter's no-op too)
        if self._writes:
            self._writes_since_checkpoint += 1
            if self._writes_since_checkpoint >= self._checkpoint_after:
                self._writes_since_checkpoint = 0
                whole = self._in_thread(_commit_and_checkpoint, self._connection._conn)
                self._checkpoint_after = CHECKPOINT_EVERY if whole else CHECKPOINT_RETRY
                return
        if inline:
            try:
                self._connection._conn.commit()
            except Exception as error:  # noqa: BLE001  translated and raised, as the stock one does
                self._handle_exception(error)
            return
        super().commit()  # in the thread

    def _in_thread(self, function: Any, *args: Any) -> Any:
        try:
            return await_(self._connection._execute(function, *args))
        except Exception as error:  # noqa: BLE001  translated and raised, as the stock one does
            self._handle_exception(error)

    def rollback(self) -> None:
        self.inline = False
        # After a commit, the pool's reset on return rolls back nothing: no trip for it.
        if self.take_begin() is None and self._connection._conn.in_transaction:
            super().rollback()


class _OneTripDBAPI(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *arg: Any, **kw: Any) -> OneTripConnection:
        stock = super().connect(*arg, **kw)  # opens the aiosqlite connection and its thread
        return OneTripConnection(self, stock._connection)


class OneTripDialect(SQLiteDialect_aiosqlite):
    driver = DRIVER
    supports_statement_cache = True  # compiles exactly as the stock dialect, which caches

    @classmethod
    def import_dbapi(cls) -> Any:
        return _OneTripDBAPI(__import__("aiosqlite"), __import__("sqlite3"))


registry.register(f"sqlite.{DRIVER}", __name__, "OneTripDialect")
