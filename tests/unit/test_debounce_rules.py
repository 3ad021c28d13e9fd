"""SPEC §12's debounce rule: when a conversation's waiting reply jobs are due, for given times."""

from __future__ import annotations

import datetime as dt

from service.queue.debounce import OFF, Debounce

T0 = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.UTC)
DEFAULT = Debounce(quiet_s=1.5, max_s=8.0)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_off_is_due_at_once() -> None:
    assert OFF.due_at(at(3), at(0)) == at(3)
    assert Debounce(0, 8).due_at(at(3), None) == at(3)


def test_a_lone_message_waits_the_quiet_time() -> None:
    assert DEFAULT.due_at(at(0), None) == at(1.5)


def test_each_message_of_a_burst_moves_the_reply_to_quiet_after_the_newest() -> None:
    assert DEFAULT.due_at(at(0.2), at(0)) == at(1.7)
    assert DEFAULT.due_at(at(5.0), at(0)) == at(6.5)


def test_never_later_than_the_cap_after_the_oldest_waiting_message() -> None:
    assert DEFAULT.due_at(at(7.0), at(0)) == at(8.0)
    assert Debounce(0.3, 0.8).due_at(at(0.7), at(0)) == at(0.8)


def test_a_cap_already_passed_is_due_at_once() -> None:
    assert DEFAULT.due_at(at(9.0), at(0)) == at(9.0)


def test_a_cap_shorter_than_the_quiet_time_wins() -> None:
    assert Debounce(1.5, 0.5).due_at(at(0), None) == at(0.5)


def test_an_oldest_time_after_now_counts_as_now() -> None:
    """Clocks of two processes differ a little: a job stamped later than now is no older."""
    assert DEFAULT.due_at(at(0), at(0.1)) == at(1.5)
