"""What a real `parley serve` logs at INFO during a round trip and an operator's reply: one line
per webhook and per reply job with ids, outcome and duration; never a message body, an auth
token or an API key; in both `LOG_FORMAT`s."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import PUBLIC_BASE_URL, TWILIO_SID, TWILIO_TOKEN
from tests.fakes import FakeProviders
from tests.helpers import post_twilio, twilio_form
from tests.processes import parley_env, serving, stop

ADMIN_TOKEN = "admin-log-test-9d8c7b6a5f4e"
OPENAI_KEY = "sk-log-test-0f1e2d3c4b5a"
SENDGRID_KEY = "SG.log-test-a1b2c3d4"
BODY = "my locker code is zebra-4471"
OPERATOR_BODY = "operator says marzipan-5523"


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_logs_name_ids_and_outcomes_never_bodies_or_secrets(
    providers: FakeProviders, database_url: str, tmp_path: Path, log_format: str
) -> None:
    env = parley_env(
        DATABASE_URL=database_url,
        PUBLIC_BASE_URL=PUBLIC_BASE_URL,
        TWILIO_ACCOUNT_SID=TWILIO_SID,
        TWILIO_AUTH_TOKEN=TWILIO_TOKEN,
        TWILIO_API_BASE_URL=providers.base_url,
        OPENAI_API_KEY=OPENAI_KEY,
        OPENAI_BASE_URL=providers.base_url + "/v1",
        SENDGRID_API_KEY=SENDGRID_KEY,
        ADMIN_TOKEN=ADMIN_TOKEN,
        LOG_LEVEL="INFO",
        LOG_FORMAT=log_format,
        AUTO_MIGRATE="false",
    )
    with serving(env, tmp_path) as (port, process):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert (await post_twilio(client, twilio_form(Body=BODY))).status_code == 200
            await providers.wait_for_async(lambda: len(providers.twilio_sent) == 1)
            refused = await client.get(
                "/api/conversations", headers={"Authorization": "Bearer not-the-token-123"}
            )
            assert refused.status_code == 401
            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            [conversation] = (await client.get("/api/conversations", headers=auth)).json()[
                "conversations"
            ]
            accepted = await client.post(
                f"/api/conversations/{conversation['id']}/messages",
                headers=auth,
                json={"body": OPERATOR_BODY},
            )
            assert accepted.status_code == 202
            await providers.wait_for_async(lambda: len(providers.twilio_sent) == 2)
            await client.get(f"/c/{conversation['transcript_url'].rsplit('/', 1)[1]}")
        stop(process)

    log = (tmp_path / "serve.log").read_text()
    for secret in (
        "zebra",
        "marzipan",
        TWILIO_TOKEN,
        ADMIN_TOKEN,
        "not-the-token-123",
        OPENAI_KEY,
        SENDGRID_KEY,
        conversation["transcript_url"].rsplit("/", 1)[1],
    ):
        assert secret not in log, secret
    if log_format == "json":
        messages = [json.loads(line)["message"] for line in log.splitlines() if line.strip()]
    else:
        messages = log.splitlines()
    text = "\n".join(messages)
    assert "webhook sms conversation=1 message=1 outcome=enqueued duration_ms=" in text
    assert "reply job conversation=1 messages=1 attempt=1 outcome=answered duration_ms=" in text
    operator_job = f"reply job conversation=1 messages={accepted.json()['message_ids'][0]} "
    assert operator_job + "attempt=1 outcome=sent duration_ms=" in text
