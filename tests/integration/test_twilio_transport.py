"""Twilio's answers that the fake Twilio does not give, from a raw server on 127.0.0.1, through
the real twilio SDK: an RFC 9457 problem body (which the SDK raises as `TwilioServiceException`,
not `TwilioRestException`) keeps its meaning (retry after Retry-After, opted out, refused),
and a send accepted with a body that names no message is an ambiguous send, looked up before
it is sent again."""

from __future__ import annotations

import json

import pytest

from service.channels.twilio.rest import TwilioRest
from service.types import Channel, Outbound, RecipientOptedOut, SendError
from tests.raw_http import http_answer, model_server

SID = "AC" + "c" * 32
TEXT = Outbound(Channel.SMS, to="+15550001111", from_="+15559990000", body="hello")


def _problem(status: int, code: int, title: str) -> bytes:
    body = {"type": f"https://www.twilio.com/docs/errors/{code}", "title": title}
    body.update({"status": status, "code": code, "detail": f"{title} (detail)"})
    return json.dumps(body).encode()


async def _send(answer: bytes) -> SendError:
    async with model_server(answer) as base_url:
        rest = TwilioRest(SID, "token", base_url, timeout_s=5)
        try:
            with pytest.raises(SendError) as caught:
                await rest.send(TEXT)
        finally:
            await rest.close()
    return caught.value


async def test_a_problem_429_is_retried_after_its_retry_after() -> None:
    error = await _send(
        http_answer(
            "HTTP/1.1 429 Too Many Requests",
            "Content-Type: application/problem+json",
            "Retry-After: 7",
            body=_problem(429, 20429, "Too Many Requests"),
        )
    )
    assert error.retryable and not error.ambiguous
    assert error.retry_after_s == 7
    assert error.code == 20429
    assert str(error) == "Twilio 429 error 20429: Too Many Requests (detail)"


async def test_a_problem_21610_is_an_opted_out_recipient() -> None:
    error = await _send(
        http_answer(
            "HTTP/1.1 400 Bad Request",
            "Content-Type: application/problem+json",
            body=_problem(400, 21610, "Attempt to send to unsubscribed recipient"),
        )
    )
    assert isinstance(error, RecipientOptedOut)
    assert not error.retryable


async def test_a_problem_400_is_a_refusal() -> None:
    error = await _send(
        http_answer(
            "HTTP/1.1 400 Bad Request",
            "Content-Type: application/problem+json",
            body=_problem(400, 21211, "Invalid 'To' Phone Number"),
        )
    )
    assert not error.retryable and error.code == 21211


@pytest.mark.parametrize(
    "body", [b"<html>accepted</html>", b'{"status": "queued"}'], ids=["not JSON", "no sid"]
)
async def test_an_acceptance_naming_no_message_is_an_ambiguous_send(body: bytes) -> None:
    error = await _send(
        http_answer("HTTP/1.1 201 Created", "Content-Type: application/json", body=body)
    )
    assert error.retryable and error.ambiguous
