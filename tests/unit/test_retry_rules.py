"""Retry rules (service/retry.py) and the claim split: when a job is tried again, and which
jobs are out of tries."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.queue.manager import Claim
from service.retry import (
    MAX_BACKOFF_S,
    MAX_RETRY_AFTER_S,
    backoff_s,
    is_retryable_status,
    retry_after_seconds,
)


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


def test_only_429_and_5xx_are_worth_retrying() -> None:
    assert [s for s in (400, 401, 404, 409, 422, 429, 500, 502, 503) if is_retryable_status(s)] == [
        429,
        500,
        502,
        503,
    ]


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert retry_after_seconds("30", now) == 30
    assert retry_after_seconds(" 1.5 ", now) == 1.5
    assert retry_after_seconds("Tue, 01 Dec 2026 12:00:45 GMT", now) == 45
    assert retry_after_seconds("Tue, 01 Dec 2026 11:00:00 GMT", now) == 0  # in the past
    assert retry_after_seconds("999999", now) == MAX_RETRY_AFTER_S


@pytest.mark.parametrize("value", [None, "", "soon", "nan", "Tue, 99 Foo 2026"])
def test_unreadable_retry_after_is_none(value: str | None) -> None:
    assert retry_after_seconds(value) is None
