"""The `Model` for any OpenAI-compatible server, through the openai SDK (`OPENAI_BASE_URL`).

The SDK is imported, and its client built, at the first call: importing it costs ~45 MB of
RSS (all its typed models), which a process that starts and waits for messages, or only takes
webhooks, does not need. The import runs in a thread: it takes half a second or more on a busy
machine, and on the event loop it would stall every webhook and the lease heartbeat meanwhile.
One client then serves every call of the process.

A call goes through the SDK's client (its base URL, key, headers, time limit and error
classes) by its documented way of making a raw request, `client.post(..., cast_to=Response)`,
over the SDK's aiohttp transport (`DefaultAioHttpClient`), and the answer's few fields are read
from its JSON here (`read_answer`). Against a zero-latency model (bench/provider_calls.py) the
typed `chat.completions.create` over the default httpx2 transport costs ~3.9 ms of CPU a call
(its parameters typed, its answer built as pydantic models, httpcore2's pool); this path costs
~0.7 ms. In a reply job under load the saving was larger still: 18 -> 7.5 ms a reply.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.assistant.base import DEFAULT_OPTIONS, CallOptions, Completion, ModelError
from service.collector import freeze_again
from service.retry import is_retryable_status, retry_after_seconds
from service.settings import Settings

if TYPE_CHECKING:
    import openai


class OpenAIModel:
    """Chat completions through the openai SDK; the SDK's own retries are off (the job retries)."""

    def __init__(self, settings: Settings) -> None:
        self.name = settings.openai_model
        self.params: dict[str, Any] = {"timeout_s": settings.assistant_timeout_s}
        self._settings = settings
        self._client: openai.AsyncOpenAI | None = None

    async def _sdk(self) -> openai.AsyncOpenAI:
        if self._client is None:
            openai = await asyncio.to_thread(importlib.import_module, "openai")
            if self._client is not None:  # another call built it meanwhile
                return self._client
            self._client = openai.AsyncOpenAI(
                api_key=self._settings.openai_api_key,
                base_url=self._settings.openai_base_url or None,
                timeout=self._settings.assistant_timeout_s,
                max_retries=0,
                http_client=openai.DefaultAioHttpClient(timeout=self._settings.assistant_timeout_s),
            )
            freeze_again()  # the SDK's modules live as long as the process (`collector`)
        return self._client

    async def complete(
        self, messages: list[dict[str, Any]], options: CallOptions = DEFAULT_OPTIONS
    ) -> Completion:
        client = await self._sdk()
        import httpx2  # loaded by `_sdk` with openai already: a dictionary look-up

        started = time.perf_counter()
        body: dict[str, Any] = {"model": options.model or self.name, "messages": messages}
        if options.temperature is not None:
            body["temperature"] = options.temperature
        if options.max_tokens is not None:
            body["max_tokens"] = options.max_tokens
        try:
            response = await client.post("/chat/completions", cast_to=httpx2.Response, body=body)
        except Exception as exc:
            error = _call_error(exc)
            if error is None:  # not the model's nor the network's: a bug, with its traceback
                raise
            error.latency_ms = _ms_since(started)
            raise error from exc
        answer = read_answer(response.content)
        return Completion(
            text=answer.text,
            model=answer.model or options.model or self.name,
            params={**self.params, **options.as_params()},
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            total_tokens=answer.total_tokens,
            latency_ms=_ms_since(started),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


@dataclass(frozen=True)
class Answer:
    """The fields of a chat completion Parley keeps."""

    text: str
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None


def read_answer(content: bytes) -> Answer:
    """The first choice's text and the usage of a chat completion's JSON body. An empty or
    unreadable answer is a retryable `ModelError`: a server that answers 200 with something
    else (a proxy's page, a truncated body) may answer properly next time."""
    try:
        payload = json.loads(content)
        message = payload["choices"][0]["message"] if payload.get("choices") else {}
        text = message.get("content") or ""
        if not isinstance(text, str):
            raise TypeError(f"content is {type(text).__name__}")
        usage = payload.get("usage")
        if not isinstance(usage, dict):  # absent, null, or a server's oddity: no counts
            usage = {}
        answer = Answer(
            text=text.strip(),
            model=_str_or_none(payload.get("model")),
            prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
            completion_tokens=_int_or_none(usage.get("completion_tokens")),
            total_tokens=_int_or_none(usage.get("total_tokens")),
        )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        raise ModelError(f"the model's answer is unreadable: {exc}", retryable=True) from exc
    if not answer.text:
        raise ModelError("the model returned an empty answer", retryable=True)
    return answer


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _call_error(exc: Exception) -> ModelError | None:
    """The retryable or final `ModelError` of a failed call; None for anything else (a bug).

    Not every transport failure comes as the SDK's `APIError`: the aiohttp transport's
    exception map has no entry for a malformed answer (a garbage status line or header is
    aiohttp's `ClientResponseError`), which then escapes raw. The reply job records and retries
    only a `ModelError`, so each of these must become one."""
    import aiohttp  # loaded by the SDK's transport already
    import httpx2
    import openai

    if isinstance(exc, openai.APIError):
        return _model_error(exc)
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError too
        return ModelError("model call timed out", retryable=True)
    if isinstance(exc, aiohttp.ClientError | httpx2.RequestError | OSError):
        return ModelError(f"model unreachable: {_describe(exc)}", retryable=True)
    return None


def _model_error(exc: openai.APIError) -> ModelError:
    import openai

    failure = _connection_failure(exc)
    if isinstance(exc, openai.APITimeoutError) and failure is None:
        return ModelError("model call timed out", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        return ModelError(f"model unreachable: {_describe(failure or exc)}", retryable=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retry_after = retry_after_seconds(exc.response.headers.get("retry-after"))
        retryable = is_retryable_status(status)
        return ModelError(
            f"model answered {status}: {exc.message}",
            retryable=retryable,
            retry_after_s=retry_after,
        )
    return ModelError(str(exc), retryable=True)


def _connection_failure(exc: BaseException) -> BaseException | None:
    """The connection's own failure, not a timeout, under an SDK error. The aiohttp transport
    reports a refused connection, or a server that hangs up, as a connect *timeout* (its
    exception map picks its first match, aiohttp's base connection error); the log must say
    "unreachable", not "timed out". Only `__cause__` is followed (each layer's `raise ... from`):
    `__context__` may hold an unrelated error the call was handling."""
    import aiohttp

    cause = exc.__cause__
    while cause is not None:
        timeout = isinstance(cause, TimeoutError | aiohttp.ServerTimeoutError)
        if not timeout and isinstance(cause, aiohttp.ClientConnectionError | OSError):
            return cause
        cause = cause.__cause__
    return None


def _describe(exc: BaseException) -> str:
    """A failure's text for the log and the call record, on one line. aiohttp's parser errors
    (`ClientResponseError`) carry a status of aiohttp's own making, 400, which is not the
    server's answer, and draw a caret under the bad byte: only their message is kept."""
    import aiohttp

    if isinstance(exc, aiohttp.ClientResponseError):
        text = f"bad HTTP answer: {exc.message}"
    else:
        text = str(exc)
    return " ".join(word for word in text.split() if word != "^") or type(exc).__name__


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
