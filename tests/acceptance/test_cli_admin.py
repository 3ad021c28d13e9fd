"""`parley conversations` and `parley forget` as an operator runs them: real processes on the
database a running Parley wrote (SQLite file, PostgreSQL when configured)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from service.models import AssistantCall, Conversation, Message, ReplyJob
from tests.conftest import SettingsFactory, running_app
from tests.helpers import calls, conversations, eventually, jobs, messages, post_twilio, settled
from tests.helpers import twilio_form as form
from tests.processes import parley_env

TEXTER = "+15550001111"
OTHER = "+15550002222"


def parley(
    args: list[str], database_url: str, cwd: Path, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=parley_env(DATABASE_URL=database_url, **env),
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
async def two_people(make_settings: SettingsFactory, engine: AsyncEngine) -> None:
    """TEXTER with two turns, OTHER with one, and an email conversation stored directly."""
    async with running_app(make_settings()) as client:
        for sender, body in ((TEXTER, "Where is my order #1234?"), (OTHER, "hours today?")):
            await post_twilio(client, form(Body=body, From=sender))
            await eventually(lambda: settled(engine))
        await post_twilio(client, form(Body="thanks", From=TEXTER))
        await eventually(lambda: settled(engine))
    async with engine.begin() as connection:
        await connection.execute(
            insert(Conversation).values(
                channel="email",
                remote_address="alice@example.com",
                local_address="assistant@example.com",
                summary="Question about invoices",
                conversation_url="e" * 43,
            )
        )


async def counts(engine: AsyncEngine, remote: str) -> tuple[int, int, int, int]:
    ids = [c.id for c in await conversations(engine, Conversation.remote_address == remote)]
    return (
        len(ids),
        len(await messages(engine, Message.conversation_id.in_(ids))),
        len(await calls(engine, AssistantCall.conversation_id.in_(ids))),
        len(await jobs(engine, ReplyJob.conversation_id.in_(ids))),
    )


async def test_conversations_prints_a_table_with_transcript_links(
    two_people: None, engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    result = parley(["conversations"], database_url, tmp_path)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0].split()
    assert header[:4] == ["ID", "CHANNEL", "REMOTE", "SUMMARY"] and header[-1] == "TRANSCRIPT"
    body = "\n".join(lines[1:])
    assert lines[1].split()[1:3] == ["email", "alice@example.com"]  # newest activity first
    assert TEXTER in body and OTHER in body
    assert "Where is my order #1234?" in body
    by_remote = {c.remote_address: c for c in await conversations(engine)}
    texter_line = next(line for line in lines if TEXTER in line)
    assert texter_line.endswith(f"http://127.0.0.1:8000/c/{by_remote[TEXTER].conversation_url}")
    assert " 4 " in texter_line  # two messages each way
    assert "UTC (" in texter_line

    linked = parley(
        ["conversations", "--limit", "1"],
        database_url,
        tmp_path,
        PUBLIC_BASE_URL="https://parley.example.org",
    )
    assert linked.returncode == 0, linked.stderr
    assert "https://parley.example.org/c/" + "e" * 43 in linked.stdout
    assert "1 of 3 conversations" in linked.stdout

    for bad in ("0", "101", "lots"):
        refused = parley(["conversations", "--limit", bad], database_url, tmp_path)
        assert refused.returncode == 2 and "--limit" in refused.stderr


async def test_forget_with_yes_deletes_exactly_that_person(
    two_people: None, engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    other_before = await counts(engine, OTHER)
    assert await counts(engine, TEXTER) == (1, 4, 2, 2)

    result = parley(["forget", "+1 (555) 000-1111", "--yes"], database_url, tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"deleted 1 conversation(s), 4 message(s), 2 assistant call record(s), 2 job(s) of {TEXTER}"
    )
    assert await counts(engine, TEXTER) == (0, 0, 0, 0)
    assert await counts(engine, OTHER) == other_before
    assert len(await conversations(engine)) == 2

    again = parley(["forget", TEXTER, "--yes"], database_url, tmp_path)
    assert again.returncode == 0 and "nothing stored for +15550001111" in again.stdout


async def test_forget_asks_first(
    two_people: None, engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    declined = parley(["forget", "Alice <ALICE@Example.com>"], database_url, tmp_path, stdin="n\n")
    assert declined.returncode == 1
    assert "alice@example.com: 1 conversation(s)" in declined.stdout
    assert "nothing deleted" in declined.stdout
    assert await counts(engine, "alice@example.com") == (1, 0, 0, 0)

    no_answer = parley(["forget", "alice@example.com"], database_url, tmp_path)  # stdin closed
    assert no_answer.returncode == 1
    assert await counts(engine, "alice@example.com") == (1, 0, 0, 0)

    accepted = parley(["forget", "alice@example.com"], database_url, tmp_path, stdin="y\n")
    assert accepted.returncode == 0, accepted.stderr
    assert "deleted 1 conversation(s)" in accepted.stdout
    assert await counts(engine, "alice@example.com") == (0, 0, 0, 0)
    assert await counts(engine, TEXTER) == (1, 4, 2, 2)


def test_forget_refuses_what_is_not_an_address(tmp_path: Path) -> None:
    result = parley(
        ["forget", "5550001111", "--yes"], f"sqlite+aiosqlite:///{tmp_path}/x.db", tmp_path
    )
    assert result.returncode == 2 and "+15550001111" in result.stderr
