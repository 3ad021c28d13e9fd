"""The transcript page `/c/{token}` as the person holding the link sees it: both sides, each
reply's fate, nothing executable, nothing cached or indexed, and one 404 for every wrong token."""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.web.transcript import mask_address
from tests.conftest import SettingsFactory, running_app
from tests.fakes import FakeProviders
from tests.helpers import conversations, eventually, post_twilio, settled, twilio_form

TEXTER = "+15550001111"
FAST: dict[str, Any] = {"worker_poll_s": 0.05, "reply_retry_base_s": 0.05}


async def text(client: httpx.AsyncClient, body: str, **fields: str) -> None:
    response = await post_twilio(client, twilio_form(Body=body, **fields))
    assert response.status_code == 200, response.text


async def token_of(engine: AsyncEngine, remote: str = TEXTER) -> str:
    [conversation] = [c for c in await conversations(engine) if c.remote_address == remote]
    return str(conversation.conversation_url)


def assert_private_headers(response: httpx.Response) -> None:
    assert response.headers["x-robots-tag"].startswith("noindex")
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp


async def test_both_sides_with_statuses_escaped_and_private(
    client: httpx.AsyncClient, engine: AsyncEngine, providers: FakeProviders
) -> None:
    await text(client, "Hello <script>alert('x')</script> & bye")
    await eventually(lambda: settled(engine))
    await text(client, "second one")
    await eventually(lambda: settled(engine))

    response = await client.get(f"/c/{await token_of(engine)}")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert_private_headers(response)
    page = response.text
    assert "<script" not in page.lower()  # nothing executable, not even the texter's markup
    assert "Hello &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; bye" in page
    assert "echo: Hello &lt;script&gt;" in page and "echo: second one" in page
    assert page.index("second one") > page.index("Hello &lt;script")  # oldest first
    assert "+1555•••1111" in page and TEXTER not in page
    assert "SMS conversation" in page
    assert page.count(">queued<") == 2  # each reply's delivery status (Twilio's first answer)
    assert page.count('class="foot"><time datetime="') == 4  # every message has its time
    assert 'name="viewport"' in page


async def test_the_style_sheet_is_the_one_the_policy_allows(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await text(client, "hi")
    response = await client.get(f"/c/{await token_of(engine)}")

    [style] = re.findall(r"<style>(.*?)</style>", response.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in response.headers["content-security-policy"]
    assert " style=" not in response.text  # inline style attributes would be blocked


async def test_failed_rate_limited_operator_and_delivery_are_marked(
    make_settings: SettingsFactory, engine: AsyncEngine, providers: FakeProviders
) -> None:
    settings = make_settings(reply_rate_limit="1/hour", admin_token="admin-secret", **FAST)
    async with running_app(settings) as client:
        await text(client, "first")
        await eventually(lambda: settled(engine))
        await text(client, "second, over the limit")
        await eventually(lambda: settled(engine))
        [conversation] = await conversations(engine)
        providers.twilio_plan(("error", 400, 21211, "The 'To' number is not a valid phone number"))
        response = await client.post(
            f"/api/conversations/{conversation.id}/messages",
            json={"body": "A person here: sorry about that."},
            headers={"Authorization": "Bearer admin-secret"},
        )
        assert response.status_code == 202
        await eventually(lambda: settled(engine))
        await client.post(
            f"/api/conversations/{conversation.id}/messages",
            json={"body": "Trying once more."},
            headers={"Authorization": "Bearer admin-secret"},
        )
        await eventually(lambda: settled(engine))
        sid = providers.twilio_sent[-1]["sid"]
        status = await post_twilio(
            client,
            {**twilio_form("twilio/status_delivered.json"), "MessageSid": sid, "SmsSid": sid},
            path="/webhooks/twilio/status",
        )
        assert status.status_code == 204
        page = (await client.get(f"/c/{conversation.conversation_url}")).text

    assert "rate limited: not answered" in page
    assert page.count(">Operator<") == 2
    assert ">failed<" in page and "not a valid phone number" in page  # the error is shown
    assert "delivered" in page


async def test_a_reply_without_credentials_is_marked_not_sent(
    make_settings: SettingsFactory, engine: AsyncEngine
) -> None:
    async with running_app(make_settings(twilio_account_sid=None)) as client:
        await text(client, "anyone there?")
        await eventually(lambda: settled(engine))
        page = (await client.get(f"/c/{await token_of(engine)}")).text

    assert "not sent: no provider credentials" in page


async def test_paused_and_opted_out_conversations_say_so(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await text(client, "STOP")
    await eventually(lambda: settled(engine))
    page = (await client.get(f"/c/{await token_of(engine)}")).text

    assert "Opted out" in page and "opt-out: no more replies" in page


def _other(char: str) -> str:
    return "A" if char != "A" else "B"


def _one_off(token: str, at: int) -> str:
    """The token with one character changed."""
    return token[:at] + _other(token[at]) + token[at + 1 :]


async def test_unknown_and_nearly_right_tokens_get_the_same_404(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await text(client, "hi")
    token = await token_of(engine)
    wrong = [
        "nope",
        token[:-1] + _other(token[-1]),
        _one_off(token, 0),
        _one_off(token, len(token) // 2),
        token[:-1],
        token + "x",
        token.swapcase(),
        "x" * 500,
        "%C3%A9" * 10,
        "%00" + token[1:],
        token[:-1] + "%20",
    ]
    wrong = [candidate for candidate in wrong if candidate != token]

    responses = [await client.get(f"/c/{candidate}") for candidate in wrong]

    assert {r.status_code for r in responses} == {404}
    assert {r.text for r in responses} == {"not found\n"}
    for response in responses:
        assert_private_headers(response)
    assert (await client.get(f"/c/{token}")).status_code == 200


@pytest.mark.parametrize(
    ("address", "masked"),
    [
        ("+15550001111", "+1555•••1111"),
        ("+447911123456", "+4479•••3456"),
        ("alice@example.com", "a•••@example.com"),
        ("12345", "12•••45"),
        ("abc", "•••"),
    ],
)
def test_addresses_are_masked(address: str, masked: str) -> None:
    assert mask_address(address) == masked
