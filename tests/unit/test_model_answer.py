"""Reading a chat completion's JSON body (`assistant.openai.read_answer`): what Parley keeps of
a well-formed answer, and a retryable error for anything else a server may send with a 200."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.assistant import ModelError
from service.assistant.openai import read_answer


def completion(**fields: object) -> bytes:
    body: dict[str, object] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1760000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "  We open at nine.\n"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 41, "completion_tokens": 5, "total_tokens": 46},
    }
    body.update(fields)
    return json.dumps(body).encode()


def test_a_completion_gives_its_text_model_and_usage() -> None:
    answer = read_answer(completion())
    assert answer.text == "We open at nine."
    assert answer.model == "gpt-4o-mini-2024-07-18"
    assert (answer.prompt_tokens, answer.completion_tokens, answer.total_tokens) == (41, 5, 46)


def test_usage_and_model_are_optional() -> None:
    # Some OpenAI-compatible servers (llama.cpp's, older vLLM) leave them out.
    answer = read_answer(completion(usage=None, model=""))
    assert answer.text == "We open at nine."
    assert answer.model is None
    assert answer.total_tokens is None


@pytest.mark.parametrize(
    "body",
    [
        completion(choices=[]),
        completion(choices=[{"message": {"role": "assistant", "content": None}}]),
        completion(choices=[{"message": {"role": "assistant", "content": "   "}}]),
    ],
    ids=["no choices", "null content", "blank content"],
)
def test_an_empty_answer_is_retryable(body: bytes) -> None:
    with pytest.raises(ModelError, match="empty answer") as caught:
        read_answer(body)
    assert caught.value.retryable


@pytest.mark.parametrize("usage", [["41", "5"], "46 tokens", 46])
def test_odd_usage_leaves_the_counts_out_of_a_good_answer(usage: object) -> None:
    answer = read_answer(completion(usage=usage))
    assert answer.text == "We open at nine."
    assert (answer.prompt_tokens, answer.completion_tokens, answer.total_tokens) == (None,) * 3


@pytest.mark.parametrize(
    "body",
    [
        b"<html>502 Bad Gateway</html>",
        b'{"choices": [{"message": {"content": ',
        b"[1, 2, 3]",
        b'{"choices": "none"}',
        b'{"choices": [{"message": {"content": ["a", "b"]}}]}',
        b'{"choices": [{"text": "legacy completion"}]}',
        b"[" * 100_000,
        b'{"choices": ' * 100_000,
    ],
    ids=[
        "html",
        "truncated",
        "a list",
        "choices not a list",
        "content not text",
        "no message",
        "nested too deep",
        "objects nested too deep",
    ],
)
def test_an_unreadable_body_is_a_retryable_model_error(body: bytes) -> None:
    with pytest.raises(ModelError, match="unreadable") as caught:
        read_answer(body)
    assert caught.value.retryable


# The names a chat completion uses, so that generated JSON reaches past the first lookup.
FIELD_NAMES = ["choices", "message", "content", "usage", "model", "role", "total_tokens"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)
json_bodies = json_values.map(lambda value: json.dumps(value).encode())


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode) | json_bodies)
def test_any_body_gives_an_answer_or_a_model_error(body: bytes) -> None:
    try:
        answer = read_answer(body)
    except ModelError:
        return
    assert answer.text and answer.text == answer.text.strip()


@given(
    content=st.text(max_size=40).filter(str.strip),
    usage=json_values,
    model=json_values,
)
def test_a_good_answer_is_read_whatever_its_usage_and_model_hold(
    content: str, usage: object, model: object
) -> None:
    """A server's odd `usage` or `model` costs the counts or the name, never the answer."""
    body = completion(
        choices=[{"message": {"role": "assistant", "content": content}}], usage=usage, model=model
    )
    answer = read_answer(body)
    assert answer.text == content.strip()
    assert answer.model in (None, model)
    counts = (answer.prompt_tokens, answer.completion_tokens, answer.total_tokens)
    assert all(count is None or isinstance(count, int) for count in counts)
