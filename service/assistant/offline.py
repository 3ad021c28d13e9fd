"""The offline assistant: Parley's default without `OPENAI_API_KEY`."""

from __future__ import annotations

from typing import Any

from service.assistant.base import DEFAULT_OPTIONS, CallOptions, Completion

OFFLINE_MODEL_NAME = "parley-offline"


class OfflineModel:
    """Answers at once, deterministically, and says it is offline: the laptop default, so a
    newcomer sees the whole loop without an account."""

    def __init__(self) -> None:
        self.name = OFFLINE_MODEL_NAME
        self.params: dict[str, Any] = {}

    async def complete(
        self, messages: list[dict[str, Any]], options: CallOptions = DEFAULT_OPTIONS
    ) -> Completion:
        users = [_text(m["content"]) for m in messages if m["role"] == "user"]
        earlier = sum(1 for m in messages if m["role"] != "system") - 1
        text = (
            f'[offline assistant] You said: "{users[-1] if users else ""}". '
            f"I remember {earlier} earlier message(s) of this conversation. "
            "Set OPENAI_API_KEY for real answers."
        )
        # The record says the offline assistant answered; what a profile asked for is kept.
        params = {**self.params, **options.as_params()}
        if options.model:
            params["requested_model"] = options.model
        return Completion(text=text, model=self.name, params=params)

    async def close(self) -> None:
        return None


def _text(content: str | list[dict[str, Any]]) -> str:
    """A user turn's text, also when it carries images as content parts."""
    if isinstance(content, str):
        return content
    images = sum(1 for part in content if part.get("type") == "image_url")
    text = " ".join(str(part["text"]) for part in content if part.get("type") == "text")
    return f"{text} [{images} image(s)]".strip()
