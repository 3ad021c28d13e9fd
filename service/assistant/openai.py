"""The `Model` for any OpenAI-compatible server, through the openai SDK (`OPENAI_BASE_URL`)."""

from __future__ import annotations

import time
from typing import Any

import openai

from service.assistant.base import DEFAULT_OPTIONS, CallOptions, Completion, ModelError
from service.retry import is_retryable_status, retry_after_seconds
from service.settings import Settings


class OpenAIModel:
    """Chat completions through the openai SDK; the SDK's own retries are off (the job retries)."""

    def __init__(self, settings: Settings) -> None:
        self.name = settings.openai_model
        self.params: dict[str, Any] = {"timeout_s": settings.assistant_timeout_s}
        self._client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key,
            base_url=settings.openai_base_url or None,
            timeout=settings.assistant_timeout_s,
            max_retries=0,
        )

    async def complete(
        self, messages: list[dict[str, Any]], options: CallOptions = DEFAULT_OPTIONS
    ) -> Completion:
        started = time.perf_counter()
        asked: dict[str, Any] = {}
        if options.temperature is not None:
            asked["temperature"] = options.temperature
        if options.max_tokens is not None:
            asked["max_tokens"] = options.max_tokens
        try:
            response = await self._client.chat.completions.create(
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
        await self._client.close()


def _model_error(exc: openai.APIError) -> ModelError:
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
