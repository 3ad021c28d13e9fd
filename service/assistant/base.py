"""The `Model` seam: `Model.complete(messages) -> Completion`, or `ModelError`.

The worker only sees `Model.complete(messages) -> Completion` and `ModelError`; which server
answers (OpenAI, Ollama, vLLM, a test fake) is a matter of `OPENAI_BASE_URL`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


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

    async def complete(self, messages: list[dict[str, Any]]) -> Completion: ...

    async def close(self) -> None: ...
