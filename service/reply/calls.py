"""One model call with its time limit, its metrics and its record (`assistant_call`), for the
reply and for the summary alike: the record says which (`purpose`) and for which assistant
profile (`generation_params["profile"]`). A failed call is recorded here; an answered one's
record is handed back, to be stored in the transaction that stores what it wrote (the answer,
`outbox.store_reply`; the summary, `memory.save_summary`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from service import metrics
from service.assistant import CallOptions, Completion, Model, ModelError
from service.store import AsyncEngine, outbox
from service.types import CallPurpose


class ModelCaller:
    def __init__(self, engine: AsyncEngine, model: Model, timeout_s: float) -> None:
        self._engine = engine
        self._model = model
        self._timeout_s = timeout_s

    async def call(
        self,
        conversation_id: int,
        prompt: list[dict[str, str]],
        options: CallOptions,
        *,
        purpose: CallPurpose,
        profile: str | None,
    ) -> tuple[Completion, outbox.CallRecord]:
        """The completion and its record, not stored yet; a failure is recorded, then raised as
        a `ModelError` (a timeout is a retryable one)."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s + 5):
                completion = await self._model.complete(prompt, options)
        except (ModelError, TimeoutError) as exc:
            error = (
                exc
                if isinstance(exc, ModelError)
                else ModelError("model call timed out", retryable=True)
            )
            error.latency_ms = error.latency_ms or int((time.perf_counter() - started) * 1000)
            metrics.observe_model_call(error.latency_ms / 1000, False, None, None)
            params = {**self._model.params, **options.as_params()}
            failed = _record(
                conversation_id,
                model=options.model or self._model.name,
                params=_with_profile(params, profile),
                processing_time=error.latency_ms,
                purpose=purpose,
                ok=False,
                error=str(error),
            )
            await outbox.record_call(self._engine, failed)
            if error is not exc:
                raise error from exc
            raise
        metrics.observe_model_call(
            completion.latency_ms / 1000,
            True,
            completion.prompt_tokens,
            completion.completion_tokens,
        )
        return completion, _record(
            conversation_id,
            model=completion.model,
            params=_with_profile(completion.params, profile),
            processing_time=completion.latency_ms,
            purpose=purpose,
            ok=True,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            total_tokens=completion.total_tokens,
        )


def _record(
    conversation_id: int,
    *,
    model: str,
    params: dict[str, Any],
    processing_time: int,
    purpose: CallPurpose,
    ok: bool,
    **rest: Any,
) -> outbox.CallRecord:
    return outbox.CallRecord(
        conversation_id=conversation_id,
        model=model,
        generation_params=params,
        processing_time=processing_time,
        ok=ok,
        purpose=purpose.value,
        **rest,
    )


def _with_profile(params: dict[str, Any], profile: str | None) -> dict[str, Any]:
    return {**params, "profile": profile} if profile else dict(params)
