"""When to try again: the one copy of Parley's retry rules, for the worker and every provider.

A provider failure is worth retrying when it says so (HTTP 429, any 5xx) and is final otherwise;
its `Retry-After` (seconds, or an HTTP date) is a floor under Parley's own exponential backoff,
which is jittered so that a burst of failures does not come back as one burst.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import random

MAX_BACKOFF_S = 600.0
MAX_RETRY_AFTER_S = 3600.0  # a provider asking for more is capped, not obeyed for days


def is_retryable_status(status: int) -> bool:
    """429 (slow down) and 5xx (the provider's trouble) may pass; any other 4xx will not."""
    return status == 429 or status >= 500


def retry_after_seconds(value: object, now: dt.datetime | None = None) -> float | None:
    """A `Retry-After` header as seconds from now: delta-seconds or an HTTP date (RFC 9110),
    None when absent or unreadable, never negative, at most `MAX_RETRY_AFTER_S`."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        seconds: float | None = float(text)
    except ValueError:
        seconds = _seconds_until(text, now)
    if seconds is None or seconds != seconds:  # absent, unreadable or NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _seconds_until(http_date: str, now: dt.datetime | None) -> float | None:
    try:
        moment = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return (moment - (now or dt.datetime.now(dt.UTC))).total_seconds()


def backoff_s(attempt: int, base_s: float, retry_after_s: float | None = None) -> float:
    """Exponential backoff with jitter; a provider's Retry-After is a floor."""
    exponential: float = base_s * float(2 ** min(max(attempt - 1, 0), 30))
    delay = min(exponential, MAX_BACKOFF_S) * random.uniform(0.5, 1.0)
    return max(delay, retry_after_s or 0.0)
