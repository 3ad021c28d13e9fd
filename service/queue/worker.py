"""The reply worker: claims conversations with due jobs and runs their `ReplyFlow`s, many at
once (model calls are I/O-bound), never two for one conversation.

Woken at once by an in-process webhook commit, which names the conversations it gave a job
(hints); otherwise it polls. While it is caught up (its last look at the whole queue left
nothing due behind), it claims the hinted conversations by their ids, without reading the
whole queue: on SQLite that read is a trip to a reader's thread, the slowest step between a
webhook and its reply. It reads the whole queue again at least once a poll interval however
busy, when one of its retries or a quiet time falls due, after a wake without hints (another
process's NOTIFY, the API, a webhook under a quiet time), a claim that filled its capacity,
more hints than room, or a claim refused for want of it. A conversation whose job ends is
looked at again only if a claim passed it over while it ran (its hint came, or the whole queue
was read): at low rates a second claim after every reply, finding nothing, was a write
transaction a message. Leases are renewed by a heartbeat while jobs run. On stop it claims
nothing more, lets running jobs finish for a grace period, and gives the rest back to the
queue for the next process.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import heapq
import logging
import os
import secrets
import socket
import time
from collections.abc import Collection

from service.db import utcnow
from service.models import LEASE_OWNER_CHARS
from service.queue.manager import Claim, JobManager, next_due
from service.queue.notify import listen_for_jobs
from service.reply.flow import GiveUp, Outcome, ReplyContext, ReplyFlow, RetryLater, Superseded
from service.retry import backoff_s

log = logging.getLogger(__name__)

DUE_MARGIN_S = 0.002  # wake just after a job's `run_after`, not a hair before it


def worker_id(host: str | None = None) -> str:
    """`host:pid:random`: readable in logs, unique per process, and always within the lease
    owner column. A host name too long for it (a Kubernetes pod's may have 253 characters)
    keeps its start plus a digest of the whole name, so long names sharing a prefix differ."""
    host = socket.gethostname() if host is None else host
    tail = f":{os.getpid()}:{secrets.token_hex(3)}"
    room = LEASE_OWNER_CHARS - len(tail)
    if len(host) > room:
        digest = hashlib.sha256(host.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        host = f"{host[: room - len(digest) - 1]}~{digest}"
    return host + tail


class Worker:
    def __init__(self, context: ReplyContext, owner: str | None = None) -> None:
        settings = context.settings
        self.queue = JobManager(context.engine, owner or worker_id(), settings.reply_lease_s)
        self.flow = ReplyFlow(context)
        self._settings = settings
        self._poll_interval_s = settings.worker_poll_s
        self._engine = context.engine
        # On PostgreSQL every commit's NOTIFY has the worker read the queue anyway: no hints.
        self._hinted = context.engine.dialect.name == "sqlite"
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._running: dict[int, asyncio.Task[None]] = {}
        self._claims: dict[int, Claim] = {}  # what the running tasks hold, for lease renewal
        self._hints: set[int] = set()  # conversations given a job since the last claim
        # Running conversations a claim passed over (hinted, or the whole queue read): they may
        # hold a job that waits for their running one, so they are looked at again when it ends.
        self._recheck: set[int] = set()
        self._scan = True  # whether the next claim reads the whole queue
        self._scan_at = 0.0  # `time.monotonic()` by which it reads it anyway: the poll, a due time
        self._retries_due: list[float] = []  # when this worker's retries fall due (a heap)

    def wake(self, conversations: Collection[int] | None = None) -> None:
        """Look for work now: in these conversations, or (None) anywhere in the queue."""
        if conversations is None or not self._hinted:
            self._scan = True
        else:
            self._hints.update(conversations)
        self._wake.set()

    async def run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(), name="parley-lease-heartbeat")
        listener = asyncio.create_task(
            listen_for_jobs(self._settings.database_url, self.wake), name="parley-listen"
        )
        log.info(
            "reply worker %s started (concurrency %d)",
            self.queue.owner,
            self._settings.worker_concurrency,
        )
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                claimed = await self._claim_some()
                if claimed and self._room() > 0:
                    continue  # there may be more due work
                await self._sleep()
            # Leases stay renewed while `stop()` lets running jobs finish.
            await asyncio.gather(*self._running.values(), return_exceptions=True)
        finally:
            heartbeat.cancel()
            listener.cancel()
            await asyncio.gather(heartbeat, listener, return_exceptions=True)

    async def stop(self) -> None:
        """Stop claiming; let running jobs finish for `SHUTDOWN_GRACE_S`; give the rest back."""
        self._stopping.set()
        self._wake.set()
        running = list(self._running.values())
        if running:
            _, late = await asyncio.wait(running, timeout=self._settings.shutdown_grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _claim_some(self) -> int:
        free = self._room()
        if free <= 0:
            self._scan = True  # what was hinted meanwhile waits for capacity, in queue order
            return 0
        now = time.monotonic()
        # More hints than room: the whole queue, in its order, decides which go first.
        scan = self._scan or now >= self._next_scan_at() or len(self._hints) > free
        if scan:  # hints keep coming under load: the poll's and the due times' scans still run
            self._scan, self._scan_at = False, now + self._poll_interval_s
            while self._retries_due and self._retries_due[0] <= now:
                heapq.heappop(self._retries_due)
        hints, self._hints = self._hints, set()
        self._recheck.update(self._running.keys() if scan else hints & self._running.keys())
        try:
            claims = await self.queue.claim(free, among=None if scan else hints)
        except Exception:
            log.exception("claiming reply jobs failed")
            self._scan = True
            return 0
        if len(claims) == free:
            self._scan = True  # there may be more due work than this claim had room for
        for claim in claims:
            task = asyncio.create_task(self._handle(claim), name=f"reply-{claim.conversation_id}")
            self._running[claim.conversation_id] = task
            self._claims[claim.conversation_id] = claim
            task.add_done_callback(functools.partial(self._done, claim.conversation_id))
        return len(claims)

    def _room(self) -> int:
        """How many more conversations this worker may run now."""
        return self._settings.worker_concurrency - len(self._running)

    def _done(self, conversation_id: int, task: asyncio.Task[None]) -> None:
        # The conversation's next job may be claimed between the finishing commit and this
        # callback: its task's entries are not this one's to remove.
        if self._running.get(conversation_id) is task:
            del self._running[conversation_id]
            del self._claims[conversation_id]
        if conversation_id in self._recheck:  # it may have new messages, held back while it ran
            self._recheck.discard(conversation_id)
            self.wake([conversation_id])
        elif self._scan or self._hints:  # a claim refused for want of room: there is room now
            self._wake.set()

    async def _sleep(self) -> None:
        waiters = [
            asyncio.create_task(self._wake.wait()),
            asyncio.create_task(self._stopping.wait()),
        ]
        if self._room() <= 0:
            # No room to claim into, whatever falls due: a job that ends wakes it (`_done`).
            # (Napping to a due time already past, it woke every 2 ms while at capacity.)
            nap = self._poll_interval_s
        else:
            due_s = max(self._next_scan_at() - time.monotonic(), DUE_MARGIN_S)
            nap = min(await self._nap_s(), due_s)
        woken, _ = await asyncio.wait(waiters, timeout=nap, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if not woken:
            self._scan = True  # the poll: retries and quiet times falling due, lost wake-ups

    def _next_scan_at(self) -> float:
        return min(self._scan_at, self._retries_due[0]) if self._retries_due else self._scan_at

    async def _nap_s(self) -> float:
        """The poll interval, or less when a queued job falls due sooner (a burst's quiet time
        ending), so a debounced reply goes out when due, not at the next poll."""
        if self._settings.reply_debounce_s <= 0:
            return self._poll_interval_s
        try:
            due = await next_due(self._engine)
        except Exception:
            log.exception("reading the next due reply job failed")
            return self._poll_interval_s
        if due is None:
            return self._poll_interval_s
        until_due = (due - utcnow()).total_seconds() + DUE_MARGIN_S
        self._scan_at = min(self._scan_at, time.monotonic() + until_due)
        return min(self._poll_interval_s, max(until_due, DUE_MARGIN_S))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.queue.lease_s / 3)
            if self._running:
                try:
                    await self.queue.renew(
                        [job for claim in self._claims.values() for job in claim.job_ids]
                    )
                except Exception:
                    log.exception("renewing job leases failed")

    async def _handle(self, claim: Claim) -> None:
        started = time.perf_counter()
        outcome: Outcome = Outcome.ERROR
        try:
            outcome = await self.flow.run(claim)  # finishes the jobs with its last write
        except asyncio.CancelledError:
            outcome = Outcome.RELEASED
            await asyncio.shield(self.queue.release(claim.job_ids))
            raise
        except RetryLater as exc:
            outcome = await self._retry_or_fail(claim, str(exc), exc.retry_after_s)
        except GiveUp as exc:
            outcome = Outcome.FAILED
            await self._fail(claim, str(exc))
        except Superseded as exc:
            # The messages were answered elsewhere. Where this worker still holds the jobs,
            # they are done; where the other worker holds them, `finish` leaves them alone.
            outcome = Outcome.SUPERSEDED
            log.warning("conversation %s: %s", claim.conversation_id, exc)
            await self.queue.finish(claim.job_ids)
        except Exception as exc:
            log.exception("reply job for conversation %s crashed", claim.conversation_id)
            outcome = await self._retry_or_fail(claim, f"{type(exc).__name__}: {exc}", None)
        finally:
            log.info(
                "reply job conversation=%s messages=%s attempt=%d outcome=%s duration_ms=%d",
                claim.conversation_id,
                ",".join(map(str, claim.message_ids)),
                claim.attempts,
                outcome,
                (time.perf_counter() - started) * 1000,
            )

    async def _retry_or_fail(
        self, claim: Claim, error: str, retry_after_s: float | None
    ) -> Outcome:
        exhausted, remaining = claim.split(self._settings.reply_max_attempts)
        if exhausted is not None:
            await self._fail(exhausted, error)
        if remaining is None:
            return Outcome.FAILED
        claim = remaining
        delay = backoff_s(claim.attempts, self._settings.reply_retry_base_s, retry_after_s)
        log.warning(
            "conversation %s: attempt %d failed (%s); retrying in %.1fs",
            claim.conversation_id,
            claim.attempts,
            error,
            delay,
        )
        await self.queue.retry(claim.job_ids, error, delay)
        # Its due time: hints alone would never find it, and no quiet time reads `next_due`.
        heapq.heappush(self._retries_due, time.monotonic() + delay + DUE_MARGIN_S)
        self._wake.set()  # a sleeping worker plans its nap again, to wake when this falls due
        return Outcome.RETRY

    async def _fail(self, claim: Claim, error: str) -> None:
        log.error("conversation %s: giving up: %s", claim.conversation_id, error)
        await self.flow.give_up(claim, error)
        await self.queue.fail(claim.job_ids, error)
