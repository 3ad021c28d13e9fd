"""Prometheus metrics: counters and histograms kept by each process, and queue gauges read
from the database at scrape time.

Several processes: every process counts what *it* did (the web app its webhooks, a worker its
replies, model calls and sends), so Prometheus scrapes each process on its own (`/metrics` of
every `parley serve` replica, `parley worker --metrics-port` of every worker) and sums with
`sum by (…)`. The queue gauges come from the job table, so every process reports the same
values: take `max` of them, not `sum`.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from service.queue.manager import QueueState, queue_state

__all__ = ["CONTENT_TYPE_LATEST", "exposition"]

# `*_created` series only double the output; Prometheus needs none.
disable_created_metrics()  # type: ignore[no-untyped-call]

WEBHOOKS = Counter(
    "parley_webhooks",
    "Provider webhook requests handled, by channel, kind (message or status) and result.",
    ["channel", "kind", "result"],
)
REPLIES = Counter(
    "parley_replies",
    "Outcomes of replies: parts sent, not sent (no credentials) or failed; messages "
    "rate limited or failed before a reply was written.",
    ["status"],
)
RATE_LIMITED = Counter(
    "parley_rate_limited",
    "Messages not answered because a limit was reached, by scope: conversation "
    "(REPLY_RATE_LIMIT) or global (MODEL_CALLS_LIMIT, the whole deployment).",
    ["scope"],
)
for _scope in ("conversation", "global"):  # both series exist from the start, at 0
    RATE_LIMITED.labels(_scope)
ASSISTANT_LATENCY = Histogram(
    "parley_assistant_latency_seconds",
    "Duration of one model call, by outcome.",
    ["outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
)
ASSISTANT_TOKENS = Counter(
    "parley_assistant_tokens",
    "Tokens used by model calls, by kind (prompt, completion).",
    ["kind"],
)
SEND_LATENCY = Histogram(
    "parley_provider_send_latency_seconds",
    "Duration of one send to a provider (Twilio, SendGrid), by channel.",
    ["channel"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15),
)
SEND_ERRORS = Counter(
    "parley_provider_send_errors",
    "Sends a provider refused or failed, by channel and whether a retry may help.",
    ["channel", "retryable"],
)


def refusal_result(status: int) -> str:
    return {400: "invalid", 401: "unauthorized", 403: "unauthorized", 413: "too_large"}.get(
        status, f"refused_{status}"
    )


def count_webhook(channel: str, kind: str, result: str) -> None:
    """A webhook request, labelled by the plugin that owns its route."""
    WEBHOOKS.labels(channel, kind, result).inc()


def count_inbound(channel: str, duplicate: bool, enqueued: bool) -> None:
    """A message webhook that got its 2xx: a redelivery, stored with a reply to come, or
    stored without one by design (opt-out keywords, paused, auto-replies)."""
    result = "duplicate" if duplicate else ("accepted" if enqueued else "stored")
    WEBHOOKS.labels(channel, "message", result).inc()


def count_replies(status: str, amount: int = 1) -> None:
    if amount > 0:
        REPLIES.labels(status).inc(amount)


def count_rate_limited(scope: str, amount: int) -> None:
    """Messages marked `rate_limited`; also counted as `parley_replies_total{status=…}`, the
    name dashboards used before the global limit existed."""
    if amount > 0:
        RATE_LIMITED.labels(scope).inc(amount)
        count_replies("rate_limited", amount)


def observe_model_call(
    seconds: float, ok: bool, prompt_tokens: int | None = None, completion_tokens: int | None = None
) -> None:
    ASSISTANT_LATENCY.labels("ok" if ok else "error").observe(seconds)
    if prompt_tokens:
        ASSISTANT_TOKENS.labels("prompt").inc(prompt_tokens)
    if completion_tokens:
        ASSISTANT_TOKENS.labels("completion").inc(completion_tokens)


def observe_send(channel: str, seconds: float, error_retryable: bool | None = None) -> None:
    """One send: its duration, and if it failed, whether retrying may help."""
    SEND_LATENCY.labels(channel).observe(seconds)
    if error_retryable is not None:
        SEND_ERRORS.labels(channel, "true" if error_retryable else "false").inc()


def _queue_exposition(state: QueueState) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    depth = Gauge(
        "parley_queue_depth",
        "Reply jobs by state (queued = waiting, due = may run now, running = held by a "
        "worker), read from the database at scrape time.",
        ["state"],
        registry=registry,
    )
    depth.labels("queued").set(state.queued)
    depth.labels("due").set(state.due)
    depth.labels("running").set(state.running)
    Gauge(
        "parley_queue_oldest_due_age_seconds",
        "How long the oldest due reply job has been waiting (0 when none is).",
        registry=registry,
    ).set(state.oldest_due_age_s)
    return generate_latest(registry)


async def exposition(engine: AsyncEngine | None) -> bytes:
    """This process's metrics, plus the queue gauges when a database is at hand."""
    text = generate_latest(REGISTRY)
    if engine is not None:
        text += _queue_exposition(await queue_state(engine))
    return text
