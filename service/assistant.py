"""The `Model` seam, and the offline assistant (the OpenAI one is in `openai_model`).

The worker only sees `Model.complete(messages) -> Completion` and `ModelError`; which server
answers (OpenAI, Ollama, vLLM, a test fake) is a matter of `OPENAI_BASE_URL`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

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
    if not settings.openai_api_key:
        return OfflineModel()
    # Imported on use: the SDK is large, and the offline default does not need it.
    from service.openai_model import OpenAIModel

    return OpenAIModel(settings)
