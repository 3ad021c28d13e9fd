"""Backoff and the claim split: when a job is tried again, and which jobs are out of tries."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.jobs import Claim
from service.worker import MAX_BACKOFF_S, backoff_s


def test_backoff_doubles_with_jitter_between_half_and_full() -> None:
    for attempt, full in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0)]:
        delays = [backoff_s(attempt, 1.0) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > 0  # jittered, so retries do not stampede


def test_backoff_is_capped() -> None:
    assert all(backoff_s(60, 1.0) <= MAX_BACKOFF_S for _ in range(50))


def test_retry_after_is_a_floor() -> None:
    assert backoff_s(1, 0.05, retry_after_s=30) == 30
    assert backoff_s(1, 100.0, retry_after_s=1) >= 50


@given(st.integers(min_value=-3, max_value=100), st.floats(min_value=0.001, max_value=10))
def test_backoff_is_never_negative_nor_above_the_cap(attempt: int, base: float) -> None:
    assert 0 <= backoff_s(attempt, base) <= MAX_BACKOFF_S


def _claim(*attempts: int) -> Claim:
    return Claim(
        conversation_id=7,
        job_ids=tuple(100 + i for i in range(len(attempts))),
        message_ids=tuple(200 + i for i in range(len(attempts))),
        attempts=max(attempts),
        job_attempts=attempts,
    )


def test_split_separates_jobs_out_of_tries_from_the_rest() -> None:
    done, left = _claim(6, 2, 6, 1).split(exhausted_after=6)
    assert done is not None and left is not None
    assert (done.job_ids, done.message_ids, done.attempts) == ((100, 102), (200, 202), 6)
    assert (left.job_ids, left.message_ids, left.attempts) == ((101, 103), (201, 203), 2)


def test_split_when_all_or_none_are_out_of_tries() -> None:
    assert _claim(1, 2).split(6) == (None, _claim(1, 2))
    done, left = _claim(6, 7).split(6)
    assert left is None and done is not None and done.job_ids == (100, 101)
