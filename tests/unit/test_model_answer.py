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


@pytest.mark.parametrize(
    "body",
    [
        b"<html>502 Bad Gateway</html>",
        b'{"choices": [{"message": {"content": ',
        b"[1, 2, 3]",
        b'{"choices": "none"}',
        b'{"choices": [{"message": {"content": ["a", "b"]}}]}',
        b'{"choices": [{"text": "legacy completion"}]}',
    ],
    ids=["html", "truncated", "a list", "choices not a list", "content not text", "no message"],
)
def test_an_unreadable_body_is_a_retryable_model_error(body: bytes) -> None:
    with pytest.raises(ModelError, match="unreadable") as caught:
        read_answer(body)
    assert caught.value.retryable


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_body_gives_an_answer_or_a_model_error(body: bytes) -> None:
    try:
        answer = read_answer(body)
    except ModelError:
        return
    assert answer.text and answer.text == answer.text.strip()
