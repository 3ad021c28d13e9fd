"""The `Model` seam: `Model.complete(messages, options) -> Completion`, or `ModelError`.

The worker only sees `Model.complete(messages, options) -> Completion` and `ModelError`; which
server answers (OpenAI, Ollama, vLLM, a test fake) is a matter of `OPENAI_BASE_URL`. `options`
carry what one call asks beyond the deployment's defaults: an assistant profile's model,
temperature and reply length (SPEC §11), or a summary call's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class CallOptions:
    """One call's own parameters; None leaves the model's (or the server's) default."""

    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None

    def as_params(self) -> dict[str, Any]:
        """What of these the call record keeps (`generation_params`)."""
        return {
            key: value
            for key, value in (("temperature", self.temperature), ("max_tokens", self.max_tokens))
            if value is not None
        }


DEFAULT_OPTIONS = CallOptions()


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

    async def complete(
        self, messages: list[dict[str, Any]], options: CallOptions = DEFAULT_OPTIONS
    ) -> Completion: ...

    async def close(self) -> None: ...
