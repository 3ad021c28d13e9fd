"""Budgets of bytes held at once (`byte_budget.ByteBudget`; big mails being read,
`admission.MailBudget`; pictures for prompts): first come, first served, ordinary mail never
waits, work that goes away gives back what it held, and what turned out unneeded goes back."""

from __future__ import annotations

import asyncio

import pytest

from service.byte_budget import ByteBudget
from service.channels.sendgrid.admission import (
    KEPT_PER_MAIL_BYTES,
    SMALL_MAIL_BYTES,
    MailBudget,
    small_share,
)

LIMIT = 30 * 1024 * 1024
MB = 1024 * 1024


@pytest.mark.parametrize(
    ("declared", "share"),
    [
        (None, KEPT_PER_MAIL_BYTES),  # chunked: counted as the largest
        (1000, 0),
        (SMALL_MAIL_BYTES, 0),
        (SMALL_MAIL_BYTES + 1, SMALL_MAIL_BYTES + 1),
        (LIMIT, KEPT_PER_MAIL_BYTES),
        (LIMIT + 1, 0),  # refused unread: nothing to hold
    ],
)
def test_a_mail_holds_its_declared_size_up_to_what_is_kept_of_one(
    declared: int | None, share: int
) -> None:
    assert MailBudget.share(declared, LIMIT) == share


async def started(coroutine: object) -> asyncio.Task[None]:
    task = asyncio.ensure_future(coroutine)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    return task


async def hold(
    budget: MailBudget, share: int, until: asyncio.Event, log: list[str], name: str
) -> None:
    async with budget.held(share):
        log.append(name)
        await until.wait()


async def test_a_big_mail_waits_for_room_and_mails_go_in_arrival_order() -> None:
    budget, log = MailBudget(10 * MB), []
    first, second, third = asyncio.Event(), asyncio.Event(), asyncio.Event()
    a = await started(hold(budget, 8 * MB, first, log, "a"))
    b = await started(hold(budget, 6 * MB, second, log, "b"))
    c = await started(hold(budget, 2 * MB, third, log, "c"))  # would fit now, but b came first
    await started(hold(budget, 0, asyncio.Event(), log, "small"))
    assert log == ["a", "small"] and budget.waiting == 2
    first.set()
    await a
    await asyncio.sleep(0)
    assert log == ["a", "small", "b", "c"] and budget.in_flight == 8 * MB
    second.set(), third.set()
    await asyncio.gather(b, c)
    assert budget.in_flight == 0 and budget.waiting == 0


async def test_a_sender_gone_while_waiting_leaves_the_queue_and_the_next_goes() -> None:
    budget, log = MailBudget(10 * MB), []
    first = asyncio.Event()
    a = await started(hold(budget, 10 * MB, first, log, "a"))
    gone = await started(hold(budget, 10 * MB, asyncio.Event(), log, "gone"))
    after = await started(hold(budget, 1 * MB, asyncio.Event(), log, "after"))
    gone.cancel()
    await asyncio.sleep(0)
    assert budget.waiting == 1
    first.set()
    await a
    await asyncio.sleep(0)
    assert log == ["a", "after"] and budget.in_flight == 1 * MB
    after.cancel()
    await asyncio.sleep(0)
    assert budget.in_flight == 0


async def test_a_sender_gone_just_as_its_turn_came_hands_its_share_on() -> None:
    budget, log = MailBudget(10 * MB), []
    async with budget.held(10 * MB):
        unlucky = await started(hold(budget, 10 * MB, asyncio.Event(), log, "unlucky"))
        last = await started(hold(budget, 10 * MB, asyncio.Event(), log, "last"))
    unlucky.cancel()  # its turn has come (given back above), but it has not run since
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert log == ["last"] and budget.in_flight == 10 * MB
    last.cancel()
    await asyncio.sleep(0)
    assert budget.in_flight == 0 and budget.waiting == 0


async def test_what_a_holder_turns_out_not_to_need_lets_the_next_one_in_at_once() -> None:
    budget, log = ByteBudget(10 * MB), []
    async with budget.held(50 * MB) as held:  # more than the budget: the whole budget
        assert held.share == 10 * MB
        waiting = await started(hold(budget, 6 * MB, asyncio.Event(), log, "next"))
        assert log == []
        held.keep(3 * MB)  # fetched: three of the ten it might have been
        await asyncio.sleep(0)
        assert log == ["next"] and budget.in_flight == 9 * MB
        held.keep(20 * MB)  # never more than it had
        assert held.share == 3 * MB
    assert budget.in_flight == 6 * MB
    waiting.cancel()
    await asyncio.sleep(0)
    assert budget.in_flight == 0


@pytest.mark.parametrize(
    ("declared", "big", "small"),
    [
        (None, KEPT_PER_MAIL_BYTES, 0),  # chunked: a big one
        (20_000, 0, 20_000),
        (SMALL_MAIL_BYTES, 0, SMALL_MAIL_BYTES),
        (SMALL_MAIL_BYTES + 1, SMALL_MAIL_BYTES + 1, 0),
        (LIMIT + 1, 0, 0),  # refused unread: held by neither
    ],
)
def test_every_mail_read_holds_its_share_of_exactly_one_budget_but_one_refused_unread(
    declared: int | None, big: int, small: int
) -> None:
    assert (MailBudget.share(declared, LIMIT), small_share(declared)) == (big, small)
