"""The reply-job queue on a real database (SQLite file, and PostgreSQL when configured):
enqueue, claims by conversation, leases, retries, release, and two claimers side by side."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3

import pytest
from sqlalchemy import event, make_url, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.channels.twilio.sms import TwilioSms
from service.db import reader
from service.models import ReplyJob
from service.queue.manager import Claim, JobManager, queue_state
from service.settings import Settings
from service.store.conversations import add_operator_message
from service.store.inbound import record_inbound
from service.types import Channel, Inbound

OUR_NUMBER = "+15550009999"
_sids = itertools.count(1)


async def _receive(engine: AsyncEngine, remote: str, count: int = 1) -> list[int]:
    """`count` SMS messages from `remote`, stored (with their jobs) in one transaction."""
    inbounds = [
        Inbound(Channel.SMS, f"SM{next(_sids):032d}", remote, OUR_NUMBER, f"question {n}")
        for n in range(count)
    ]
    async with engine.begin() as connection:
        recorded = await record_inbound(connection, inbounds)
    assert all(r.enqueued for r in recorded)
    return [r.message_id for r in recorded if r.message_id is not None]


async def _jobs(engine: AsyncEngine) -> list[ReplyJob]:
    async with engine.connect() as connection:
        return list(await connection.execute(select(ReplyJob).order_by(ReplyJob.id)))  # type: ignore[arg-type]


async def test_a_claim_takes_every_due_job_of_a_conversation(engine: AsyncEngine) -> None:
    first = await _receive(engine, "+15550001111", 3)
    second = await _receive(engine, "+15550002222")
    claims = await JobManager(engine, "worker-a").claim(10)
    assert [c.message_ids for c in claims] == [tuple(first), tuple(second)]
    assert all(c.attempts == 1 for c in claims)
    jobs = await _jobs(engine)
    assert [(j.status, j.attempts, j.lease_owner) for j in jobs] == [("running", 1, "worker-a")] * 4


async def test_no_claim_while_the_conversation_has_a_job_running(engine: AsyncEngine) -> None:
    await _receive(engine, "+15550001111")
    [held] = await JobManager(engine, "worker-a").claim(10)
    await _receive(engine, "+15550001111")  # arrives while the first is being answered
    assert await JobManager(engine, "worker-b").claim(10) == []
    await JobManager(engine, "worker-a").finish(held.job_ids)
    [later] = await JobManager(engine, "worker-b").claim(10)
    assert later.conversation_id == held.conversation_id
    assert later.job_ids != held.job_ids


async def test_renew_keeps_the_lease_and_an_expired_lease_is_claimed_again(
    engine: AsyncEngine,
) -> None:
    await _receive(engine, "+15550001111")
    keeper = JobManager(engine, "worker-a", lease_s=60)
    [claim] = await keeper.claim(10)
    assert await keeper.renew(claim.job_ids) == 1
    assert await JobManager(engine, "worker-b").claim(10) == []  # the lease holds

    await _receive(engine, "+15550002222")
    dying = JobManager(engine, "worker-dead", lease_s=-1)  # its lease is over at once
    [lost] = await dying.claim(10)
    [taken] = await JobManager(engine, "worker-b").claim(10)
    assert taken.job_ids == lost.job_ids
    assert taken.attempts == 2  # the dead worker's try counts
    assert await dying.renew(lost.job_ids) == 0  # it no longer holds the job
    await dying.finish(lost.job_ids)  # and cannot settle it either
    assert [j.lease_owner for j in await _jobs(engine)] == ["worker-a", "worker-b"]


async def test_a_job_waiting_out_a_retry_holds_back_the_newer_ones(engine: AsyncEngine) -> None:
    await _receive(engine, "+15550001111")
    queue = JobManager(engine, "worker-a")
    [failed] = await queue.claim(10)
    await queue.retry(failed.job_ids, "model timed out", delay_s=3600)
    await _receive(engine, "+15550001111")  # due now, but behind the waiting one
    assert await queue.claim(10) == []
    assert await queue.claim(10, among={failed.conversation_id}) == []  # a webhook's hint too
    [job, newer] = await _jobs(engine)
    assert (job.status, job.last_error, job.lease_owner) == ("queued", "model timed out", None)
    assert newer.status == "queued"

    await queue.retry((), "nothing", 0)  # no jobs: nothing happens
    await JobManager(engine, "worker-a").retry(failed.job_ids, "again", 0)  # not running: no-op
    assert (await _jobs(engine))[0].last_error == "model timed out"


async def test_a_retry_that_is_due_is_claimed_with_the_newer_jobs(engine: AsyncEngine) -> None:
    await _receive(engine, "+15550001111")
    queue = JobManager(engine, "worker-a")
    [failed] = await queue.claim(10)
    await queue.retry(failed.job_ids, "provider said 503", delay_s=0)
    await _receive(engine, "+15550001111")
    [both] = await queue.claim(10)
    assert len(both.job_ids) == 2
    assert both.job_attempts == (2, 1)


async def test_a_claim_among_some_conversations_takes_only_theirs_and_only_what_is_due(
    engine: AsyncEngine,
) -> None:
    """The worker's hints (a webhook just gave these conversations a job): looked up by id."""
    [first] = await _receive(engine, "+15550001111")
    await _receive(engine, "+15550002222", 2)
    [third] = await _receive(engine, "+15550003333")
    queue = JobManager(engine, "worker-a")
    conversations = {j.message_id: j.conversation_id for j in await _jobs(engine)}
    hinted = {conversations[first], conversations[third]}
    claims = await queue.claim(10, among=hinted)
    assert sorted(c.conversation_id for c in claims) == sorted(hinted)
    assert await queue.claim(10, among=hinted) == []  # running now: nothing more to take
    assert await queue.claim(10, among=set()) == []
    [second] = await queue.claim(10)  # the whole queue: the one not hinted
    assert len(second.job_ids) == 2
    assert await queue.claim(1, among=hinted | {second.conversation_id}) == []


async def test_release_gives_jobs_back_without_counting_the_attempt(engine: AsyncEngine) -> None:
    await _receive(engine, "+15550001111")
    queue = JobManager(engine, "worker-a")
    [claim] = await queue.claim(10)
    await queue.release(claim.job_ids)
    [job] = await _jobs(engine)
    assert (job.status, job.attempts, job.lease_owner) == ("queued", 0, None)
    [again] = await JobManager(engine, "worker-b").claim(10)
    assert again.attempts == 1


async def test_finish_and_fail_settle_only_the_holders_jobs(engine: AsyncEngine) -> None:
    await _receive(engine, "+15550001111")
    await _receive(engine, "+15550002222")
    queue = JobManager(engine, "worker-a")
    first, second = await queue.claim(10)
    await queue.finish(first.job_ids)
    await queue.fail(second.job_ids, "refused")
    jobs = await _jobs(engine)
    assert [(j.status, j.last_error) for j in jobs] == [("done", None), ("failed", "refused")]


async def test_two_claimers_never_share_a_conversation(engine: AsyncEngine) -> None:
    for n in range(12):
        await _receive(engine, f"+1555000{n:04d}", 2)
    claimers = [JobManager(engine, f"worker-{n}") for n in range(2)]
    rounds: list[list[Claim]] = []
    for _ in range(4):  # bounded: 4 rounds of 3 conversations each, racing
        rounds += await asyncio.gather(*(c.claim(3) for c in claimers))
    claims = [claim for batch in rounds for claim in batch]
    conversations = [c.conversation_id for c in claims]
    print(f"{len(claims)} claims over {len(set(conversations))} conversations")
    assert len(conversations) == len(set(conversations)) == 12
    assert all(len(c.job_ids) == 2 for c in claims)
    assert sorted(j for c in claims for j in c.job_ids) == [j.id for j in await _jobs(engine)]


async def test_on_sqlite_a_claim_reads_without_the_write_lock_and_takes_only_what_still_holds(
    engine: AsyncEngine, database_url: str
) -> None:
    """SQLite's claim reads the claimable conversations on a reader, then takes them in a
    write of its own. Here another claimer takes the conversation's first job right after that
    read (with the write lock free, which it must be: the read holds none), leaving a newer
    job queued: the claim's write must not take the newer job while the first one runs."""
    if not database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL reads and takes in one transaction, under its row locks")
    await _receive(engine, "+15550001111")
    await _receive(engine, "+15550001111")  # the same conversation: two jobs queued
    path = make_url(database_url).database
    landed: list[str] = []

    def another_claim_lands(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "GROUP BY" not in statement or landed:  # the claimable conversations were read
            return
        other = sqlite3.connect(str(path), timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # "database is locked" if the claim held the lock
            other.execute(
                "UPDATE reply_job SET status = 'running', lease_owner = 'worker-a'"
                " WHERE id = (SELECT min(id) FROM reply_job)"
            )
            other.execute("COMMIT")
        finally:
            other.close()
        landed.append(statement)

    event.listen(reader(engine).sync_engine, "after_cursor_execute", another_claim_lands)
    assert await JobManager(engine, "worker-b").claim(10) == []
    assert landed, "the claim did not read the claimable conversations on a reader"
    jobs = await _jobs(engine)
    assert [(j.status, j.lease_owner) for j in jobs] == [("running", "worker-a"), ("queued", None)]


async def test_an_operator_message_is_enqueued_like_a_webhook(engine: AsyncEngine) -> None:
    [message_id] = await _receive(engine, "+15550001111")
    [claim] = await JobManager(engine, "worker-a").claim(10)
    await JobManager(engine, "worker-a").finish(claim.job_ids)
    sms = TwilioSms(Settings(_env_file=None))
    parts = await add_operator_message(
        engine, claim.conversation_id, "A person writes back.", (None, {}), sms.split
    )
    jobs = await _jobs(engine)
    assert [(j.message_id, j.status, j.attempts) for j in jobs] == [
        (message_id, "done", 1),
        (parts[0], "queued", 0),
    ]
    [operator] = await JobManager(engine, "worker-a").claim(10)
    assert operator.message_ids == (parts[0],)


async def test_queue_state_counts_what_metrics_shows(engine: AsyncEngine) -> None:
    await _receive(engine, "+15550001111")
    await _receive(engine, "+15550002222")
    await _receive(engine, "+15550003333")
    queue = JobManager(engine, "worker-a")
    [running] = await queue.claim(1)
    state = await queue_state(engine)
    assert (state.queued, state.due, state.running) == (2, 2, 1)
    assert state.oldest_due_age_s >= 0
    await queue.retry(running.job_ids, "later", delay_s=3600)
    state = await queue_state(engine)
    assert (state.queued, state.due, state.running) == (3, 2, 0)
