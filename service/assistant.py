"""The `Model` seam: the OpenAI-compatible implementation and the offline one.

The worker only sees `Model.complete(messages) -> Completion` and `ModelError`; which server
answers (OpenAI, Ollama, vLLM, a test fake) is a matter of `OPENAI_BASE_URL`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import openai

from service.settings import Settings

OFFLINE_MODEL_NAME = "parley-offline"


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    params: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    latency_ms: int = 0


class ModelError(Exception):
    """The model did not answer; `retryable` says whether a later try may succeed."""

    def __init__(
        self, message: str, *, retryable: bool, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.latency_ms = 0


class Model(Protocol):
    name: str
    params: dict[str, Any]

    async def complete(self, messages: list[dict[str, str]]) -> Completion: ...

    async def close(self) -> None: ...


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

    async def complete(self, messages: list[dict[str, str]]) -> Completion:
        started = time.perf_counter()
        try:
            response = await self._client.chat.completions.create(
                model=self.name,
                messages=messages,  # type: ignore[arg-type]
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
            model=response.model or self.name,
            params=self.params,
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
        retry_after = _retry_after(exc.response.headers.get("retry-after"))
        retryable = status == 429 or status >= 500
        return ModelError(
            f"model answered {status}: {exc.message}",
            retryable=retryable,
            retry_after_s=retry_after,
        )
    return ModelError(str(exc), retryable=True)


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


class OfflineModel:
    """Answers at once, deterministically, and says it is offline: the laptop default, so a
    newcomer sees the whole loop without an account."""

    def __init__(self) -> None:
        self.name = OFFLINE_MODEL_NAME
        self.params: dict[str, Any] = {}

    async def complete(self, messages: list[dict[str, str]]) -> Completion:
        users = [m["content"] for m in messages if m["role"] == "user"]
        earlier = sum(1 for m in messages if m["role"] != "system") - 1
        text = (
            f'[offline assistant] You said: "{users[-1] if users else ""}". '
            f"I remember {earlier} earlier message(s) of this conversation. "
            "Set OPENAI_API_KEY for real answers."
        )
        return Completion(text=text, model=self.name, params=self.params)

    async def close(self) -> None:
        return None


def create_model(settings: Settings) -> Model:
    return OpenAIModel(settings) if settings.openai_api_key else OfflineModel()
