"""What `OpenAIModel.complete` raises when the model server misbehaves below JSON: a broken
HTTP answer, a hang-up, a hang, a refusal. Each must be a `ModelError` (the reply job records
a `ModelError` and retries it; anything else escapes unrecorded), and its message must say what
an operator should look at: "model unreachable" for a server that does not speak HTTP or goes
away, "model call timed out" for one that is there but slow.

The server (tests/raw_http.py) reads the request and answers bytes chosen by the test, so that
the failures are the ones a real socket gives, through the SDK's own aiohttp transport."""

from __future__ import annotations

import asyncio

import pytest

from service.assistant import ModelError
from service.assistant.openai import OpenAIModel
from service.settings import Settings
from tests.processes import free_port
from tests.raw_http import http_answer, model_server

ASK = [{"role": "user", "content": "When do you open?"}]
GOOD_BODY = b'{"choices": [{"message": {"role": "assistant", "content": "At nine."}}]}'


async def ask(base_url: str) -> ModelError:
    """The `ModelError` of one call to the model at `base_url` (the test fails on an answer or
    on any other exception)."""
    model = OpenAIModel(
        Settings(
            _env_file=None,  # type: ignore[call-arg]
            openai_api_key="sk-test",
            openai_base_url=base_url,
            assistant_timeout_s=1,
        )
    )
    try:
        with pytest.raises(ModelError) as caught:
            await asyncio.wait_for(model.complete(ASK), timeout=10)
    finally:
        await model.close()
    return caught.value


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"GARBAGE\r\n\r\n", "bad HTTP answer"),
        (http_answer("HTTP/1.1 200 OK", "Bad Header", body=GOOD_BODY), "bad HTTP answer"),
        (None, "disconnected"),
    ],
    ids=["garbage status line", "bad header", "hang-up after the request"],
)
async def test_a_server_that_does_not_answer_http_is_unreachable_and_retryable(
    answer: bytes | None, said: str
) -> None:
    async with model_server(answer) as base_url:
        error = await ask(base_url)
    assert str(error).startswith("model unreachable: ")
    assert said in str(error) and "\n" not in str(error)
    assert error.retryable
    assert error.latency_ms >= 0


async def test_a_server_that_hangs_is_a_retryable_timeout() -> None:
    async with model_server(None, hang=True) as base_url:
        error = await ask(base_url)
    assert str(error) == "model call timed out"
    assert error.retryable
    assert error.latency_ms >= 900  # the 1 s time limit, not an immediate failure


async def test_a_refused_connection_is_unreachable_and_retryable() -> None:
    error = await ask(f"http://127.0.0.1:{free_port()}/v1")
    assert str(error).startswith("model unreachable: ")
    assert error.retryable


async def test_a_429_is_retryable_after_the_servers_retry_after() -> None:
    answer = http_answer(
        "HTTP/1.1 429 Too Many Requests",
        "Content-Type: application/json",
        "Retry-After: 7",
        body=b'{"error": {"message": "Rate limit reached", "type": "requests"}}',
    )
    async with model_server(answer) as base_url:
        error = await ask(base_url)
    assert str(error).startswith("model answered 429")
    assert error.retryable
    assert error.retry_after_s == 7


async def test_a_400_is_final() -> None:
    answer = http_answer(
        "HTTP/1.1 400 Bad Request",
        "Content-Type: application/json",
        body=b'{"error": {"message": "maximum context length is 8192", "type": "invalid"}}',
    )
    async with model_server(answer) as base_url:
        error = await ask(base_url)
    assert str(error).startswith("model answered 400")
    assert not error.retryable


async def test_a_good_answer_through_the_same_server_is_read() -> None:
    """The server above speaks enough HTTP for the SDK: the failures are the answers' own."""
    answer = http_answer("HTTP/1.1 200 OK", "Content-Type: application/json", body=GOOD_BODY)
    async with model_server(answer) as base_url:
        model = OpenAIModel(
            Settings(_env_file=None, openai_api_key="sk-test", openai_base_url=base_url)  # type: ignore[call-arg]
        )
        try:
            completion = await model.complete(ASK)
        finally:
            await model.close()
    assert completion.text == "At nine."
