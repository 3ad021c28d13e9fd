"""A budget of bytes held at once, handed out first come, first served (big mails being read,
pictures being fetched for a prompt): work that would hold more waits its turn instead of
taking the host's memory."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class Held:
    """A share of a budget; `keep` hands back what turned out not to be needed."""

    def __init__(self, budget: ByteBudget, share: int) -> None:
        self._budget = budget
        self.share = share

    def keep(self, size: int) -> None:
        """Hold only `size` bytes (at most the share) from now on."""
        size = max(0, min(size, self.share))
        self._budget._give_back(self.share - size)
        self.share = size


class ByteBudget:
    """`capacity` bytes; a share larger than it is taken as the whole budget."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def in_flight(self) -> int:
        return self.capacity - self._free

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def held(self, share: int) -> AsyncIterator[Held]:
        """`share` bytes for the duration of the block, once those before it have theirs."""
        share = max(0, min(share, self.capacity))
        await self._take(share)
        held = Held(self, share)
        try:
            yield held
        finally:
            self._give_back(held.share)

    async def _take(self, share: int) -> None:
        if share == 0:
            return
        if not self._waiting and share <= self._free:
            self._free -= share
            return
        turn = asyncio.get_running_loop().create_future()
        entry = (share, turn)
        self._waiting.append(entry)
        try:
            await turn
        except BaseException:  # the work was cancelled while waiting
            if turn.done() and not turn.cancelled():
                self._give_back(share)  # its turn had come: hand it on
            else:
                with contextlib.suppress(ValueError):  # `_wake` may have dropped it already
                    self._waiting.remove(entry)
                self._wake()
            raise

    def _give_back(self, share: int) -> None:
        self._free += share
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self._waiting[0][0] <= self._free:
            share, turn = self._waiting.popleft()
            if turn.done():  # cancelled, its waiter not yet resumed to say so
                continue
            self._free -= share
            turn.set_result(None)
