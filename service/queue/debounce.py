"""When a reply job becomes due: the debounce rule of SPEC §12, pure (no I/O, no clock of its own).

People type a question as several short texts. A job that waits for quiet is due once its
conversation has been quiet for `REPLY_DEBOUNCE_S` counting from the newest message, but never
later than `REPLY_DEBOUNCE_MAX_S` after the oldest message still waiting: so a burst is answered
once, and a person who never stops typing is still answered. The queue manager applies the rule
to `run_after` when it enqueues, to the new job and to the conversation's other waiting ones.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True)
class Debounce:
    """`REPLY_DEBOUNCE_S` and `REPLY_DEBOUNCE_MAX_S`; a quiet time of 0 turns the rule off."""

    quiet_s: float = 0.0
    max_s: float = 0.0

    @property
    def on(self) -> bool:
        return self.quiet_s > 0

    def due_at(self, now: dt.datetime, oldest_waiting: dt.datetime | None) -> dt.datetime:
        """When a conversation's waiting jobs are due after a message arrived `now`:
        `min(now + quiet, oldest waiting + max)`, and at once when the cap has passed.
        `oldest_waiting` None: only the new message waits."""
        if not self.on:
            return now
        oldest = now if oldest_waiting is None else min(oldest_waiting, now)
        quiet_end = now + dt.timedelta(seconds=self.quiet_s)
        cap = oldest + dt.timedelta(seconds=self.max_s)
        return max(min(quiet_end, cap), now)


OFF = Debounce()
