"""SPEC §12's debounce in the queue, on a real database (SQLite file, and PostgreSQL when
configured): when enqueued jobs are due, what a new message does to the conversation's waiting
jobs, and what it leaves alone (retries, running jobs). Times are the stored ones; the rule's
arithmetic is in tests/unit/test_debounce_rules.py."""

from __future__ import annotations

import datetime as dt
import itertools

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.channels.twilio.sms import TwilioSms
from service.models import ReplyJob
from service.queue.debounce import Debounce
from service.queue.manager import JobManager, next_due
from service.settings import Settings
from service.store.conversations import add_operator_message
from service.store.inbound import record_inbound
from service.types import Channel, Inbound, Intent

OUR_NUMBER = "+15550009999"
TEXTER = "+15550001111"
_sids = itertools.count(1)


async def _receive(
    engine: AsyncEngine, debounce: Debounce, intent: Intent = Intent.MESSAGE, remote: str = TEXTER
) -> int:
    inbound = Inbound(Channel.SMS, f"SM{next(_sids):032d}", remote, OUR_NUMBER, "hi", intent)
    async with engine.begin() as connection:
        [recorded] = await record_inbound(connection, [inbound], debounce)
    assert recorded.enqueued and recorded.message_id
    return recorded.message_id


async def _jobs(engine: AsyncEngine) -> list[ReplyJob]:
    async with engine.connect() as connection:
        return list(await connection.execute(select(ReplyJob).order_by(ReplyJob.id)))  # type: ignore[arg-type]


def _after(moment: dt.datetime, seconds: float) -> dt.datetime:
    return moment + dt.timedelta(seconds=seconds)


async def test_a_burst_is_due_once_quiet_after_its_newest_message(engine: AsyncEngine) -> None:
    debounce = Debounce(quiet_s=30, max_s=60)
    await _receive(engine, debounce)
    await _receive(engine, debounce)
    first, second = await _jobs(engine)
    assert first.run_after == second.run_after == _after(second.created_at, 30)
    assert await JobManager(engine, "worker-a").claim(10) == []  # not quiet yet
    assert await next_due(engine) == second.run_after


async def test_a_burst_is_due_at_the_cap_after_its_oldest_message(engine: AsyncEngine) -> None:
    debounce = Debounce(quiet_s=30, max_s=30)  # the second message comes a little later
    await _receive(engine, debounce)
    await _receive(engine, debounce)
    first, second = await _jobs(engine)
    assert first.created_at < second.created_at
    assert first.run_after == second.run_after == _after(first.created_at, 30)


async def test_other_conversations_and_retries_keep_their_times(engine: AsyncEngine) -> None:
    await _receive(engine, Debounce(0, 0))
    [claim] = await JobManager(engine, "worker-a").claim(10)
    await JobManager(engine, "worker-a").retry(claim.job_ids, "model 500", delay_s=300)
    [retrying] = await _jobs(engine)
    await _receive(engine, Debounce(quiet_s=30, max_s=60), remote="+15550002222")
    await _receive(engine, Debounce(quiet_s=30, max_s=60))
    still, other, new = await _jobs(engine)
    assert (still.run_after, still.attempts) == (retrying.run_after, 1)  # its backoff stands
    assert other.run_after == _after(other.created_at, 30)
    assert new.run_after == _after(new.created_at, 30)


async def test_a_running_job_is_not_rescheduled(engine: AsyncEngine) -> None:
    debounce = Debounce(quiet_s=30, max_s=60)
    await _receive(engine, Debounce(0, 0))
    [held] = await JobManager(engine, "worker-a").claim(10)
    await _receive(engine, debounce)
    running, queued = await _jobs(engine)
    assert (running.status, running.run_after <= running.updated_at) == ("running", True)
    assert queued.run_after == _after(queued.created_at, 30)  # the oldest waiting is itself
    assert held.job_ids == (running.id,)


async def test_help_ends_the_wait_of_the_conversation(engine: AsyncEngine) -> None:
    debounce = Debounce(quiet_s=30, max_s=60)
    await _receive(engine, debounce)
    await _receive(engine, debounce, Intent.HELP)
    question, help_ = await _jobs(engine)
    assert question.run_after == help_.run_after == help_.created_at
    [claim] = await JobManager(engine, "worker-a").claim(10)
    assert claim.job_ids == (question.id, help_.id)


async def test_an_operator_reply_ends_the_wait_of_the_conversation(engine: AsyncEngine) -> None:
    await _receive(engine, Debounce(quiet_s=30, max_s=60))
    [question] = await _jobs(engine)
    sms = TwilioSms(Settings(_env_file=None))
    [part] = await add_operator_message(
        engine, question.conversation_id, "Sam here.", (None, {}), sms.split
    )
    waited, operator = await _jobs(engine)
    assert operator.message_id == part
    assert waited.run_after == operator.run_after == operator.created_at
    [claim] = await JobManager(engine, "worker-a").claim(10)
    assert claim.message_ids == (question.message_id, part)
