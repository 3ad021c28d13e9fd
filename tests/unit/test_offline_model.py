"""The offline assistant honours the call-options seam: a profile's options are recorded, and
the record still says the offline assistant answered."""

from __future__ import annotations

from service.assistant import OFFLINE_MODEL_NAME, CallOptions, OfflineModel


async def test_a_profiles_options_are_recorded_beside_the_offline_name() -> None:
    completion = await OfflineModel().complete(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
        CallOptions(model="gpt-bakery", temperature=0.3, max_tokens=400),
    )
    assert completion.model == OFFLINE_MODEL_NAME
    assert completion.params == {
        "temperature": 0.3,
        "max_tokens": 400,
        "requested_model": "gpt-bakery",
    }
    assert '"hi"' in completion.text
