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

It relies on one private method of aiosqlite, `Connection._execute(fn, *args)` (queue `fn` for
the connection's thread and await its result), present and unchanged from aiosqlite 0.17 to
0.22; its absence would fail every SQLite test at once, not quietly.
"""

from __future__ import annotations

import collections
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
            return await_(self._in_thread(statement, operation, parameters))
        except Exception as error:  # noqa: BLE001  translated and raised, as the stock cursor does
            self._adapt_connection._handle_exception(error)

    async def _in_thread(self, statement: Any, operation: Any, parameters: Any) -> _Outcome:
        async with self._adapt_connection._execute_mutex:
            begin = self._adapt_connection.take_begin()
            connection = self._connection
            return await connection._execute(  # type: ignore[no-any-return]
                statement, connection._conn, begin, operation, parameters
            )

    def _take(self, outcome: _Outcome) -> None:
        self._description, rows, self._rowcount, self._lastrowid = outcome
        self._rows = collections.deque(rows)


class OneTripConnection(AsyncAdapt_aiosqlite_connection):
    """The stock connection adapter with one-trip cursors, and a transaction's BEGIN that
    travels with its first statement (`begin_with_next_statement`): a transaction that runs no
    statement then costs no trip at all, and one that does saves one."""

    __slots__ = ("_begin",)
    _cursor_cls = OneTripCursor  # type: ignore[assignment]  # a subclass; mypy reads it as exact

    def __init__(self, dbapi: Any, connection: Any) -> None:
        super().__init__(dbapi, connection)
        self._begin: str | None = None

    def begin_with_next_statement(self, begin: str) -> None:
        self._begin = begin

    def cursor(self, server_side: bool = False) -> Any:
        if server_side and (begin := self.take_begin()) is not None:
            # The stock streaming cursor cannot carry the BEGIN: it makes its own trip first.
            try:
                await_(self._connection._execute(self._connection._conn.execute, begin))
            except Exception as error:  # noqa: BLE001  translated and raised, as the stock one does
                self._handle_exception(error)
        return super().cursor(server_side=server_side)

    def take_begin(self) -> str | None:
        begin, self._begin = self._begin, None
        return begin

    def commit(self) -> None:
        if self.take_begin() is None:  # else: nothing ran, nothing to commit
            super().commit()

    def rollback(self) -> None:
        if self.take_begin() is None:
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
