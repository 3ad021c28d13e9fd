"""The model seam (`base`), the offline assistant and the OpenAI-compatible one, and
`create_model`, which picks one from the settings."""

from __future__ import annotations

from service.assistant.base import CallOptions, Completion, Model, ModelError
from service.assistant.offline import OFFLINE_MODEL_NAME, OfflineModel
from service.settings import Settings

__all__ = [
    "OFFLINE_MODEL_NAME",
    "CallOptions",
    "Completion",
    "Model",
    "ModelError",
    "OfflineModel",
    "create_model",
]


def create_model(settings: Settings) -> Model:
    if not settings.openai_api_key:
        return OfflineModel()
    # Imported on use: the SDK is large, and the offline default does not need it.
    from service.assistant.openai import OpenAIModel

    return OpenAIModel(settings)
