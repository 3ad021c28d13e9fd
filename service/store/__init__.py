"""Every SQL statement outside the job queue: conversations, messages, assistant calls,
delivery reports and the model-call budget.

The one convention for the database handle: a store function takes an `AsyncEngine` and opens
its own unit of work (reads through `db.reader`, which never waits for SQLite's write lock),
except the few that are steps of a caller's transaction, which take an `AsyncConnection`
(`inbound.record_inbound` and its parts, run by `InboundWriter`'s batch transaction;
`bursts.interrupted`, run inside `outbox.store_answer`'s; the queue's `enqueue`, `count_jobs` and
`close_taken_over`, run inside the transaction that stores or deletes the messages). The reply
job's writes open theirs as units of the engine's group commit (`service/group_commit.py`).
Reads for the reply flow return small frozen dataclasses, never ORM rows, so no caller holds a
session.
"""

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["AsyncConnection", "AsyncEngine"]  # so callers (`reply/`) need no SQLAlchemy import
