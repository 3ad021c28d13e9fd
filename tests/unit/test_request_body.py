"""Content-Length as `request_body` reads it: a number, none, or huge, never an exception."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from service.request_body import declared_length


def request_with(length: str | None) -> Request:
    headers = [] if length is None else [(b"content-length", length.encode())]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers})


@pytest.mark.parametrize(
    ("header", "declared"),
    [
        (None, None),
        ("", None),
        ("12", 12),
        ("-1", None),
        ("1e3", None),
        ("²", None),  # a digit to `str.isdigit`, not to `int`
        ("9" * 18, int("9" * 18)),
        ("9" * 19, 10**18),
        ("9" * 5000, 10**18),  # `int` itself refuses strings over 4,300 digits
    ],
)
def test_a_declared_length_is_a_number_none_or_huge(
    header: str | None, declared: int | None
) -> None:
    assert declared_length(request_with(header)) == declared
