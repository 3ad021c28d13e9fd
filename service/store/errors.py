"""What a database exception means for a request: refused values (400) or an unavailable
database (503), for the webhooks and the delivery callbacks alike."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import exc as sa_exc


class StorageFailure(Exception):
    """Storing failed; `status` is what the webhook answers."""

    status = 500


class StoreRefused(StorageFailure):
    """The database refused this request's values. `storable` should make that impossible, so
    it is a bug to report, but never a 5xx: the provider would retry the same bytes for days."""

    status = 400


class StoreUnavailable(StorageFailure):
    """The database cannot be reached or cannot commit now: the provider should retry."""

    status = 503


# SQLSTATE classes about the values of a statement: 22 data exception (NUL, too long, bad
# encoding), 23 integrity constraint violation. Any other database error is the database's state.
_VALUE_SQLSTATE_CLASSES = ("22", "23")


def _sqlstate(exc: BaseException) -> str | None:
    """asyncpg's SQLSTATE (SQLAlchemy wraps asyncpg's DataError as a bare `DBAPIError`)."""
    for candidate in (exc, getattr(exc, "orig", None)):
        state = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(state, str):
            return state
    return None


def _innermost(exc: BaseException) -> BaseException:
    """The driver's own exception under SQLAlchemy's wrappers (it names what happened; the
    message is not logged, as it can quote the values)."""
    inner = getattr(exc, "orig", None) or exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    return inner


def storage_failure(exc: BaseException) -> StorageFailure | None:
    """What a database exception means for the request; None for anything else (a bug).

    Refused (400): SQLAlchemy's `DataError` and `IntegrityError` (sqlite3), SQLSTATE classes 22
    and 23 (asyncpg), a string the driver cannot encode (sqlite3 raises `UnicodeEncodeError`
    unwrapped) and a parameter SQLAlchemy cannot bind (`StatementError`). Unavailable (503):
    every other database error (`OperationalError` such as "database is locked" or "unable to
    open database file", `InterfaceError`, a lost connection, an unmigrated schema), a pool
    timeout, and the OS errors of connecting (refused, unreachable, unknown host)."""
    state = _sqlstate(exc)
    detail = type(_innermost(exc)).__name__ + (f", SQLSTATE {state}" if state else "")
    if (
        isinstance(exc, sa_exc.DataError | sa_exc.IntegrityError | UnicodeError)
        or (state is not None and state[:2] in _VALUE_SQLSTATE_CLASSES)
        or (isinstance(exc, sa_exc.StatementError) and not isinstance(exc, sa_exc.DBAPIError))
    ):
        return StoreRefused(f"the database refused a value ({detail})")
    if isinstance(exc, sa_exc.DBAPIError | sa_exc.TimeoutError | OSError | TimeoutError) or state:
        return StoreUnavailable(f"the database is unavailable ({detail})")
    return None


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Raise database exceptions as the `StorageFailure` they mean; others unchanged."""
    try:
        yield
    except Exception as exc:
        failure = storage_failure(exc)
        if failure is None:
            raise
        raise failure from exc
