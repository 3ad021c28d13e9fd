"""The reply-job queue's database manager, the only code that touches the `reply_job` table:
enqueue, claim, renew, finish, retry, fail, release, and the queue state `/metrics` shows.

A job row is the only truth about pending work. The unit of work is a conversation: a claim
takes every due job of a conversation that has none running, so a burst of messages is answered
once, together, and no two workers ever hold one conversation. A claimed job carries a lease
that its worker renews; a job whose lease ran out (its process died) is queued again. A job is
due at its `run_after`: a person's message waits for its conversation to be quiet (SPEC §12,
`debounce.py`), a retry for its backoff.

Claims never wait for one another on PostgreSQL: a claim locks the conversation rows it takes
(`FOR NO KEY UPDATE SKIP LOCKED`, which leaves the foreign-key locks of a concurrent intake
alone), so concurrent claimers in many processes take disjoint conversations, and its UPDATE,
run after the locks are held, sees every claim committed before them and skips a conversation
that has a job running. On SQLite, whose one write lock every writer of the process queues
for, a claim reads the claimable conversations on a reader and then takes them in a short
write that asks again whether each job still may be taken.

One claim takes up to the worker's free capacity of conversations (on PostgreSQL in two
statements plus the lease requeue; on SQLite a read and one UPDATE; by ids, one UPDATE), so
its cost is shared by many jobs.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Select, Table, Update, and_, bindparam, exists, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db import begin_inline, reader, unindexed, utcnow
from service.group_commit import group_commit
from service.models import Conversation, ReplyJob
from service.queue.debounce import OFF, Debounce
from service.queue.notify import notify_jobs
from service.types import JobStatus

_T_REPLYJOB = cast(Table, ReplyJob.__table__)
_T_CONVERSATION = cast(Table, Conversation.__table__)


@dataclass(frozen=True)
class NewJob:
    """A reply owed in a conversation, for the message (or first stored part) `message_id`.
    `waits_for_quiet`: a person's message, debounced (SPEC §12); a HELP or an operator's reply
    is due at once, and ends the wait of the conversation's waiting messages."""

    conversation_id: int
    message_id: int
    waits_for_quiet: bool = False


async def enqueue(
    connection: AsyncConnection, jobs: Sequence[NewJob], debounce: Debounce = OFF
) -> None:
    """Queue these jobs inside the caller's transaction (the one that stored their messages),
    due when `debounce` says, and wake the workers of other processes once it commits."""
    if not jobs:
        return
    now = utcnow()
    due = await _reschedule_waiting(connection, jobs, debounce, now)
    await connection.execute(
        insert(ReplyJob),
        [
            {
                "conversation_id": job.conversation_id,
                "message_id": job.message_id,
                "status": JobStatus.QUEUED.value,
                "attempts": 0,
                "run_after": due.get(job.conversation_id, now),
                "created_at": now,
                "updated_at": now,
            }
            for job in jobs
        ],
    )
    await notify_jobs(connection)


async def _reschedule_waiting(
    connection: AsyncConnection, jobs: Sequence[NewJob], debounce: Debounce, now: dt.datetime
) -> dict[int, dt.datetime]:
    """When each conversation's jobs are due (`Debounce.due_at`, or now for a job that does
    not wait), applied here to the conversation's waiting jobs: queued, never claimed (a retry
    keeps its backoff, a running job is left alone). One SELECT, and an UPDATE only where
    earlier jobs wait; nothing at all when the debounce is off and no job ends a wait."""
    at_once = {job.conversation_id for job in jobs if not job.waits_for_quiet}
    scheduled = {job.conversation_id for job in jobs} if debounce.on else at_once
    if not scheduled:
        return {}
    # By (conversation, status): neither every queued job nor every job of the conversation.
    waiting = ReplyJob.status == JobStatus.QUEUED.value, ReplyJob.attempts == 0
    oldest = {
        row.conversation_id: _aware(row.oldest)
        for row in await connection.execute(
            select(ReplyJob.conversation_id, func.min(ReplyJob.created_at).label("oldest"))
            .where(ReplyJob.conversation_id.in_(scheduled), *waiting)
            .group_by(ReplyJob.conversation_id)
        )
    }
    due = {
        conversation_id: now
        if conversation_id in at_once
        else debounce.due_at(now, oldest.get(conversation_id))
        for conversation_id in scheduled
    }
    by_due: dict[dt.datetime, list[int]] = defaultdict(list)
    for conversation_id in oldest:
        by_due[due[conversation_id]].append(conversation_id)
    for run_after, conversation_ids in by_due.items():
        await connection.execute(
            update(ReplyJob)
            .where(ReplyJob.conversation_id.in_(conversation_ids), *waiting)
            .values(run_after=run_after)
        )
    return due


def _aware(moment: dt.datetime) -> dt.datetime:
    """An aggregate may skip the column type's decoding (SQLite): naive means UTC."""
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment


async def close_taken_over(connection: AsyncConnection, message_ids: Sequence[int]) -> None:
    """In the transaction that stores a reply: the queued jobs of messages that reply answers
    are done. A running claim takes the newer messages of its conversation into its answer
    (SPEC §12's supersede); their jobs close with it, so they are never answered again."""
    await connection.execute(
        update(ReplyJob)
        .where(ReplyJob.message_id.in_(message_ids), ReplyJob.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.DONE.value, updated_at=utcnow())
    )


async def next_due(engine: AsyncEngine, now: dt.datetime | None = None) -> dt.datetime | None:
    """The earliest `run_after` still ahead among queued jobs (a debounce or a retry ending),
    so an idle worker sleeps until then rather than a whole poll interval."""
    now = now or utcnow()
    async with reader(engine).connect() as connection:
        moment = await connection.scalar(
            select(func.min(ReplyJob.run_after)).where(
                ReplyJob.status == JobStatus.QUEUED.value, ReplyJob.run_after > now
            )
        )
    return None if moment is None else _aware(moment)


async def count_jobs(connection: AsyncConnection, conversation_ids: Sequence[int]) -> int:
    """How many jobs these conversations hold (what `forget` reports deleting with them)."""
    result = await connection.execute(
        select(func.count())
        .select_from(ReplyJob)
        .where(ReplyJob.conversation_id.in_(conversation_ids))
    )
    return int(result.scalar_one())


@dataclass(frozen=True)
class QueueState:
    queued: int
    due: int
    running: int
    oldest_due_age_s: float


async def queue_state(engine: AsyncEngine, now: dt.datetime | None = None) -> QueueState:
    """The queue's depth by state and the wait of its oldest due job, for `/metrics`."""
    now = now or utcnow()
    queued = ReplyJob.status == JobStatus.QUEUED.value
    async with reader(engine).connect() as connection:
        row = (
            await connection.execute(
                select(
                    func.count().filter(queued),
                    func.count().filter(queued, ReplyJob.run_after <= now),
                    func.count().filter(ReplyJob.status == JobStatus.RUNNING.value),
                    func.min(ReplyJob.run_after).filter(queued, ReplyJob.run_after <= now),
                )
            )
        ).one()
    oldest: dt.datetime | None = row[3]
    if oldest is not None and oldest.tzinfo is None:  # an aggregate may skip the type's decoding
        oldest = oldest.replace(tzinfo=dt.UTC)
    return QueueState(
        queued=int(row[0]),
        due=int(row[1]),
        running=int(row[2]),
        oldest_due_age_s=max((now - oldest).total_seconds(), 0.0) if oldest else 0.0,
    )


@dataclass(frozen=True)
class Claim:
    """The jobs of one conversation, held by this worker until finished or the lease ends."""

    conversation_id: int
    job_ids: tuple[int, ...]
    message_ids: tuple[int, ...]
    attempts: int  # the highest attempt count among them, this claim included
    job_attempts: tuple[int, ...] = ()  # each job's own count, in `job_ids` order
    owner: str = ""  # the worker holding them (`JobManager.owner`): only it may finish them

    def split(self, exhausted_after: int) -> tuple[Claim | None, Claim | None]:
        """(jobs out of tries, jobs with tries left): a message that joined a conversation
        late keeps its own tries instead of inheriting its older neighbour's last one."""
        done = [i for i, a in enumerate(self.job_attempts) if a >= exhausted_after]
        left = [i for i in range(len(self.job_ids)) if i not in done]
        return self._subset(done), self._subset(left)

    def _subset(self, indexes: list[int]) -> Claim | None:
        if not indexes:
            return None
        attempts = tuple(self.job_attempts[i] for i in indexes)
        return Claim(
            conversation_id=self.conversation_id,
            job_ids=tuple(self.job_ids[i] for i in indexes),
            message_ids=tuple(self.message_ids[i] for i in indexes),
            attempts=max(attempts),
            job_attempts=attempts,
            owner=self.owner,
        )


def _settle(job_ids: Sequence[int], owner: str, status: JobStatus, **values: object) -> Update:
    """Move running jobs this owner still holds: a worker that lost its lease changes nothing."""
    return (
        update(ReplyJob)
        .where(
            and_(
                ReplyJob.id.in_(job_ids),
                ReplyJob.lease_owner == owner,
                ReplyJob.status == JobStatus.RUNNING.value,
            )
        )
        .values(status=status.value, updated_at=utcnow(), **values)
    )


_JOB = _T_REPLYJOB.c
_FINISH = (  # `_settle` for DONE, built once: every reply job runs it
    update(_T_REPLYJOB)
    .where(
        _JOB.id.in_(bindparam("job_ids", expanding=True)),
        _JOB.lease_owner == bindparam("owner"),
        _JOB.status == JobStatus.RUNNING.value,
    )
    .values(status=JobStatus.DONE.value, lease_owner=None, updated_at=bindparam("now"))
)


async def finish_jobs(connection: AsyncConnection, claim: Claim) -> None:
    """Mark the claim's jobs done inside the caller's transaction: the one that records the
    job's last write (its last send), so finishing costs no transaction of its own."""
    await connection.execute(
        _FINISH, {"job_ids": list(claim.job_ids), "owner": claim.owner, "now": utcnow()}
    )


async def finish_claim(engine: AsyncEngine, claim: Claim) -> None:
    """Mark the claim's jobs done in a unit of their own (a job that wrote nothing last)."""
    await group_commit(engine).run(functools.partial(finish_jobs, claim=claim))


_OTHER, _WAITING = _T_REPLYJOB.alias("other"), _T_REPLYJOB.alias("waiting")
# Built once, as `_FINISH` (a claim per webhook at low rates): an ORM statement built per call,
# with its aliases, cost more CPU than the rest of the claim.
_TAKE = (
    update(_T_REPLYJOB)
    .where(
        _JOB.status == JobStatus.QUEUED.value,  # by (conversation, status)
        _JOB.conversation_id.in_(bindparam("conversations", expanding=True)),
        # A message committed since `_claimable` read is not due yet (its burst's quiet).
        # Not by the due index (every due job of every conversation).
        unindexed(_JOB.run_after) <= bindparam("now"),
        # Asked again here: on PostgreSQL this runs once the conversation locks are held, so
        # its snapshot holds every claim committed before them; on SQLite the conversations
        # were read before the write lock was taken.
        ~exists().where(
            _OTHER.c.conversation_id == _JOB.conversation_id,
            _OTHER.c.status == JobStatus.RUNNING.value,
        ),
        # A job waiting out a retry holds back the newer ones (their order). Two tests, not
        # one OR: each by (conversation, status), not every job the conversation had.
        ~exists().where(
            _WAITING.c.conversation_id == _JOB.conversation_id,
            _WAITING.c.status == JobStatus.QUEUED.value,
            unindexed(_WAITING.c.run_after) > bindparam("now"),
        ),
    )
    .values(
        status=JobStatus.RUNNING.value,
        lease_owner=bindparam("owner"),
        lease_expires_at=bindparam("lease_end"),
        attempts=_JOB.attempts + 1,
        updated_at=bindparam("now"),
    )
    .returning(_JOB.id, _JOB.conversation_id, _JOB.message_id, _JOB.attempts)
)
_LEASES_EXPIRED = select(
    exists().where(
        _JOB.status == JobStatus.RUNNING.value,  # by the due index: the running jobs
        _JOB.lease_expires_at < bindparam("now"),
    )
)


def _claimable_query() -> Select[Any]:
    """Conversations with queued jobs, none running, every queued job due; first come first.
    (`FOR NO KEY UPDATE SKIP LOCKED` on PostgreSQL; SQLite leaves it out.)"""
    conversations = _T_CONVERSATION.c
    running = select(_JOB.conversation_id).where(_JOB.status == JobStatus.RUNNING.value)
    due = (
        select(_JOB.conversation_id, func.min(_JOB.id).label("first_job"))
        .where(_JOB.status == JobStatus.QUEUED.value, _JOB.conversation_id.not_in(running))
        .group_by(_JOB.conversation_id)
        .having(func.max(_JOB.run_after) <= bindparam("now"))
        .subquery()
    )
    return (
        select(conversations.id)
        .join(due, due.c.conversation_id == conversations.id)
        .order_by(due.c.first_job)
        .limit(bindparam("limit"))
        .with_for_update(of=_T_CONVERSATION, skip_locked=True, key_share=True)
    )


_CLAIMABLE = _claimable_query()
_CLAIMABLE_AMONG = _CLAIMABLE.where(_T_CONVERSATION.c.id.in_(bindparam("among", expanding=True)))


class JobManager:
    """One worker's hand on the queue: what it claims carries its name (`owner`) and a lease."""

    def __init__(self, engine: AsyncEngine, owner: str, lease_s: float = 30.0) -> None:
        self._engine = engine
        self.owner = owner
        self.lease_s = lease_s

    def _lease_end(self) -> dt.datetime:
        return utcnow() + dt.timedelta(seconds=self.lease_s)

    async def claim(
        self, max_conversations: int, among: Collection[int] | None = None
    ) -> list[Claim]:
        """Up to `max_conversations` conversations with due jobs, each with all its jobs;
        `among`: only some of these conversations (those a webhook just gave a job: the worker's
        hints), looked up by their ids instead of by reading the whole queue."""
        if max_conversations < 1 or (among is not None and not among):
            return []
        if self._engine.dialect.name == "sqlite":
            return await self._claim_beside_the_writer(max_conversations, among)
        async with self._engine.begin() as connection:
            now = utcnow()
            if among is None:
                await self._requeue_expired(connection, now)
            conversations = await self._claimable(connection, now, max_conversations, among)
            if not conversations:
                return []
            rows = await self._take(connection, conversations, now)
        return _group(rows, self.owner)

    async def _claim_beside_the_writer(
        self, max_conversations: int, among: Collection[int] | None
    ) -> list[Claim]:
        """SQLite's claim. Finding the claimable conversations reads the whole queue (a backlog
        of 20,000 jobs: ~20 ms), which must hold neither the event loop nor the one write lock
        that every writer of the process queues for. So it is read on a reader, in aiosqlite's
        thread (hinted conversations, `among`, are not read at all), and the conversations are
        then taken in a short inline write whose UPDATE asks again, job by job, what the read
        saw (queued, due, nothing of its conversation running): what changed in between
        (another process's claim, a newer message whose quiet time moved its conversation's
        jobs) is skipped, not taken."""
        now = utcnow()
        if among is not None:
            conversations = sorted(among)[:max_conversations]
        else:
            conversations = await self._read_claimable(now, max_conversations)
        if not conversations:
            return []
        async with begin_inline(self._engine) as connection:
            rows = await self._take(connection, conversations, now)
        return _group(rows, self.owner)

    async def _read_claimable(self, now: dt.datetime, limit: int) -> list[int]:
        async with reader(self._engine).connect() as connection:
            if not await self._leases_expired(connection, now):
                return await self._claimable(connection, now, limit)
        # Rare (a process died): its jobs queued again, then read to be claimed now.
        async with begin_inline(self._engine) as connection:
            await self._requeue_expired(connection, now)
        async with reader(self._engine).connect() as connection:
            return await self._claimable(connection, now, limit)

    async def _take(
        self, connection: AsyncConnection, conversations: list[int], now: dt.datetime
    ) -> list[Any]:
        """Lease the conversations' due jobs to this worker; the rows, oldest first."""
        taken = await connection.execute(
            _TAKE,
            {
                "conversations": conversations,
                "now": now,
                "owner": self.owner,
                "lease_end": self._lease_end(),  # from now: the read and the lock took time
            },
        )
        return sorted(taken, key=lambda r: r.id)

    @staticmethod
    async def _leases_expired(connection: AsyncConnection, now: dt.datetime) -> bool:
        return bool(await connection.scalar(_LEASES_EXPIRED, {"now": now}))

    async def _requeue_expired(self, connection: AsyncConnection, now: dt.datetime) -> None:
        """Jobs whose worker died are queued again; rows another claimer is requeueing right
        now are skipped, so concurrent claimers never wait for (or deadlock on) each other."""
        expired = (
            select(ReplyJob.id)
            .where(
                ReplyJob.status == JobStatus.RUNNING.value,
                ReplyJob.lease_expires_at < now,
            )
            .with_for_update(skip_locked=True)
        )
        await connection.execute(
            update(ReplyJob)
            .where(ReplyJob.id.in_(expired))
            .values(status=JobStatus.QUEUED.value, lease_owner=None, updated_at=now)
        )

    async def _claimable(
        self,
        connection: AsyncConnection,
        now: dt.datetime,
        limit: int,
        among: Collection[int] | None = None,
    ) -> list[int]:
        """Conversations with queued jobs, none running, and every queued job due: a job
        waiting out a retry holds back the newer ones behind it, so replies keep their order.
        On PostgreSQL the conversations are locked, skipping those another claimer holds."""
        if among is None:
            rows = await connection.execute(_CLAIMABLE, {"now": now, "limit": limit})
        else:
            parameters = {"now": now, "limit": limit, "among": list(among)}
            rows = await connection.execute(_CLAIMABLE_AMONG, parameters)
        return list(rows.scalars())

    async def renew(self, job_ids: Sequence[int]) -> int:
        """Extend the leases of these running jobs, where this worker still holds them."""
        if not job_ids:
            return 0
        async with begin_inline(self._engine) as connection:
            result = await connection.execute(
                update(ReplyJob)
                .where(
                    ReplyJob.id.in_(job_ids),
                    ReplyJob.lease_owner == self.owner,
                    ReplyJob.status == JobStatus.RUNNING.value,
                )
                .values(lease_expires_at=self._lease_end())
            )
        return int(result.rowcount)

    async def finish(self, job_ids: Sequence[int]) -> None:
        await self._settle(job_ids, status=JobStatus.DONE, lease_owner=None)

    async def fail(self, job_ids: Sequence[int], error: str) -> None:
        await self._settle(job_ids, status=JobStatus.FAILED, last_error=error, lease_owner=None)

    async def retry(self, job_ids: Sequence[int], error: str, delay_s: float) -> None:
        await self._settle(
            job_ids,
            status=JobStatus.QUEUED,
            last_error=error,
            run_after=utcnow() + dt.timedelta(seconds=delay_s),
            lease_owner=None,
            lease_expires_at=None,
        )

    async def release(self, job_ids: Sequence[int]) -> None:
        """Give jobs back untouched (shutdown): the attempt they were claimed for is not counted."""
        await self._settle(
            job_ids,
            status=JobStatus.QUEUED,
            attempts=ReplyJob.attempts - 1,
            lease_owner=None,
            lease_expires_at=None,
        )

    async def _settle(self, job_ids: Sequence[int], status: JobStatus, **values: object) -> None:
        """A unit of the reply side's group commit, so it commits after whatever the job handed
        in before it: a job cancelled at shutdown has its jobs released only after its last
        write (an answer stored, a part moved to `sending`) is committed, never before, so
        the next claimer finds that write and resumes from it."""
        if not job_ids:
            return
        statement = _settle(job_ids, self.owner, status, **values)
        await group_commit(self._engine).run(lambda connection: connection.execute(statement))


def _group(rows: Sequence[object], owner: str) -> list[Claim]:
    by_conversation: dict[int, list[object]] = defaultdict(list)
    for row in rows:
        by_conversation[row.conversation_id].append(row)  # type: ignore[attr-defined]
    return [
        Claim(
            conversation_id=conversation_id,
            job_ids=tuple(r.id for r in jobs),  # type: ignore[attr-defined]
            message_ids=tuple(r.message_id for r in jobs),  # type: ignore[attr-defined]
            attempts=max(r.attempts for r in jobs),  # type: ignore[attr-defined]
            job_attempts=tuple(r.attempts for r in jobs),  # type: ignore[attr-defined]
            owner=owner,
        )
        for conversation_id, jobs in by_conversation.items()
    ]
