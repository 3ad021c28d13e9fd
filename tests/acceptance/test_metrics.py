"""`/metrics` as Prometheus scrapes it: values move as traffic flows. Counters belong to the
process (and so to every app a test process runs), so each test compares before and after."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import SettingsFactory, running_app
from tests.fakes import FakeProviders
from tests.helpers import eventually, post_twilio, replay, settled, twilio_form

FAST: dict[str, Any] = {"worker_poll_s": 0.05, "reply_retry_base_s": 0.05}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_counters_move_with_a_round_trip(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    before = await scrape(client)

    await replay(client, "twilio/sms_hello.json")
    await eventually(lambda: settled(engine))
    await replay(client, "twilio/sms_hello.json")  # Twilio retries: a duplicate
    await post_twilio(client, twilio_form(), signature="forged")
    sid = providers.twilio_sent[0]["sid"]
    await post_twilio(
        client,
        {**twilio_form("twilio/status_delivered.json"), "MessageSid": sid, "SmsSid": sid},
        path="/webhooks/twilio/status",
    )
    after = await scrape(client)

    webhooks = "parley_webhooks_total"
    assert delta(before, after, webhooks, channel="sms", kind="message", result="accepted") == 1
    assert delta(before, after, webhooks, channel="sms", kind="message", result="duplicate") == 1
    assert delta(before, after, webhooks, channel="sms", kind="message", result="unauthorized") == 1
    assert delta(before, after, webhooks, channel="sms", kind="status", result="applied") == 1
    assert delta(before, after, "parley_replies_total", status="sent") == 1
    latency = "parley_assistant_latency_seconds_count"
    assert delta(before, after, latency, outcome="ok") == 1
    assert delta(before, after, "parley_assistant_tokens_total", kind="prompt") > 0
    assert delta(before, after, "parley_assistant_tokens_total", kind="completion") > 0
    assert delta(before, after, "parley_provider_send_latency_seconds_count", channel="sms") == 1
    assert value(after, "parley_queue_depth", state="queued") == 0
    assert value(after, "parley_queue_oldest_due_age_seconds") == 0


async def test_failures_and_rate_limits_are_counted(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    settings = make_settings(reply_rate_limit="1/hour", **FAST)
    async with running_app(settings) as client:
        before = await scrape(client)
        providers.twilio_plan(("error", 400, 21211, "The 'To' number is not valid"))
        await post_twilio(client, twilio_form(Body="one"))
        await eventually(lambda: settled(engine))
        await post_twilio(client, twilio_form(Body="two"))
        await eventually(lambda: settled(engine))
        providers.openai_plan(500)
        await post_twilio(client, twilio_form(Body="three", From="+15550002222"))
        await eventually(lambda: settled(engine))
        after = await scrape(client)

    assert delta(before, after, "parley_replies_total", status="failed") == 1
    assert delta(before, after, "parley_replies_total", status="rate_limited") == 1
    errors = "parley_provider_send_errors_total"
    assert delta(before, after, errors, channel="sms", retryable="false") == 1
    latency = "parley_assistant_latency_seconds_count"
    assert delta(before, after, latency, outcome="error") == 1
    assert delta(before, after, latency, outcome="ok") == 2  # "one", then the retry of "three"


async def test_queue_gauges_come_from_the_database(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    async with running_app(make_settings(embedded_worker=False)) as client:
        empty = await scrape(client)
        for body in ("a", "b"):
            await post_twilio(client, twilio_form(Body=body, From="+15550003333"))
        await post_twilio(client, twilio_form(Body="c", From="+15550004444"))
        full = await scrape(client)

    assert value(empty, "parley_queue_depth", state="queued") == 0
    assert value(full, "parley_queue_depth", state="queued") == 3
    assert value(full, "parley_queue_depth", state="due") == 3
    assert value(full, "parley_queue_depth", state="running") == 0
    assert value(full, "parley_queue_oldest_due_age_seconds") > 0


async def test_metrics_carry_no_personal_data(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await replay(client, "twilio/sms_hello.json")
    await eventually(lambda: settled(engine))

    text = (await client.get("/metrics")).text
    assert "+1555" not in text and "Hello there" not in text
