"""The `Model` for any OpenAI-compatible server, through the openai SDK (`OPENAI_BASE_URL`).

The SDK is imported, and its client built, at the first call: importing it costs ~45 MB of
RSS (all its typed models), which a process that starts and waits for messages, or only takes
webhooks, does not need. The import runs in a thread: it takes half a second or more on a busy
machine, and on the event loop it would stall every webhook and the lease heartbeat meanwhile.
One client then serves every call of the process.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from typing import TYPE_CHECKING, Any

from service.assistant.base import DEFAULT_OPTIONS, CallOptions, Completion, ModelError
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
            )
        return self._client

    async def complete(
        self, messages: list[dict[str, Any]], options: CallOptions = DEFAULT_OPTIONS
    ) -> Completion:
        client = await self._sdk()
        import openai  # loaded by `_sdk` already: a dictionary look-up

        started = time.perf_counter()
        asked: dict[str, Any] = {}
        if options.temperature is not None:
            asked["temperature"] = options.temperature
        if options.max_tokens is not None:
            asked["max_tokens"] = options.max_tokens
        try:
            response = await client.chat.completions.create(
                model=options.model or self.name,
                messages=messages,  # type: ignore[arg-type]
                **asked,
            )
        except openai.APIError as exc:
            error = _model_error(exc)
            error.latency_ms = _ms_since(started)
            raise error from exc
        text = (response.choices[0].message.content or "").strip() if response.choices else ""
        if not text:
            raise ModelError("the model returned an empty answer", retryable=True)
        usage = response.usage
        return Completion(
            text=text,
            model=response.model or options.model or self.name,
            params={**self.params, **options.as_params()},
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            total_tokens=usage.total_tokens if usage else None,
            latency_ms=_ms_since(started),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


def _model_error(exc: openai.APIError) -> ModelError:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return ModelError("model call timed out", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        return ModelError(f"model unreachable: {exc}", retryable=True)
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


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
