"""The schema: migrations equal the models, constraints hold, deletes cascade, SQLite is set up."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import delete, func, inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import create_engine, session_factory
from service.migrate import alembic_config, current_revision, head_revision, upgrade
from service.models import AssistantCall, Base, Conversation, Message, ReplyJob


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


async def test_migrations_produce_exactly_the_models(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        assert await connection.run_sync(_diff) == []
    assert await current_revision(engine) == head_revision()


async def test_upgrade_from_empty_and_again_is_a_no_op(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            await connection.execute(text(f"DROP TABLE {table.name}"))
        await connection.execute(text("DROP TABLE alembic_version"))
    await upgrade(engine)
    await upgrade(engine)  # a second start finds nothing to do
    async with engine.connect() as connection:
        names = await connection.run_sync(lambda c: set(inspect(c).get_table_names()))
    assert {"conversation", "message", "assistant_call", "reply_job", "alembic_version"} <= names


def _indexed_columns(connection: Connection) -> dict[str, set[str]]:
    inspector = inspect(connection)
    indexed: dict[str, set[str]] = {}
    for table in inspector.get_table_names():
        columns: set[str] = set()
        for index in inspector.get_indexes(table):
            columns.add(index["column_names"][0])  # type: ignore[index]
        for unique in inspector.get_unique_constraints(table):
            columns.add(unique["column_names"][0])
        columns.update(inspector.get_pk_constraint(table)["constrained_columns"])
        indexed[table] = columns
    return indexed


async def test_every_foreign_key_is_indexed_and_every_table_has_created_at(
    engine: AsyncEngine,
) -> None:
    async with engine.connect() as connection:
        indexed = await connection.run_sync(_indexed_columns)
    for table in Base.metadata.sorted_tables:
        assert "created_at" in table.c, table.name
        for fk in table.foreign_keys:
            assert fk.parent.name in indexed[table.name], f"{table.name}.{fk.parent.name}"


async def _conversation_with_everything(engine: AsyncEngine, remote: str) -> int:
    async with session_factory(engine).begin() as session:
        conversation = Conversation(
            channel="sms", remote_address=remote, local_address="+15559990000"
        )
        session.add(conversation)
        await session.flush()
        inbound = Message(
            conversation_id=conversation.id,
            channel="sms",
            sender="user",
            body="hi",
            provider_message_id=f"SM-{remote}",
            status="received",
        )
        session.add(inbound)
        await session.flush()
        session.add(ReplyJob(conversation_id=conversation.id, message_id=inbound.id))
        session.add(
            AssistantCall(conversation_id=conversation.id, model="m", status="ok", message_id=None)
        )
        return conversation.id


async def _counts(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as connection:
        return {
            model.__tablename__: (
                await connection.execute(select(func.count()).select_from(model))
            ).scalar_one()
            for model in (Conversation, Message, ReplyJob, AssistantCall)
        }


async def test_deleting_a_conversation_in_sql_cascades_to_its_rows_only(
    engine: AsyncEngine,
) -> None:
    doomed = await _conversation_with_everything(engine, "+15550000001")
    await _conversation_with_everything(engine, "+15550000002")
    async with engine.begin() as connection:
        await connection.execute(delete(Conversation).where(Conversation.id == doomed))
    assert await _counts(engine) == {
        "conversation": 1,
        "message": 1,
        "reply_job": 1,
        "assistant_call": 1,
    }


async def test_deleting_a_conversation_through_the_orm_cascades(engine: AsyncEngine) -> None:
    doomed = await _conversation_with_everything(engine, "+15550000001")
    async with session_factory(engine).begin() as session:
        conversation = await session.get(Conversation, doomed)
        await session.delete(conversation)
    assert set((await _counts(engine)).values()) == {0}


@pytest.mark.parametrize(
    "duplicate",
    ["conversation_address", "provider_message_id", "conversation_url", "job_per_message"],
)
async def test_unique_constraints_hold(engine: AsyncEngine, duplicate: str) -> None:
    first = await _conversation_with_everything(engine, "+15550000001")
    sessions = session_factory(engine)
    with pytest.raises(IntegrityError):
        async with sessions.begin() as session:
            existing = await session.get(Conversation, first)
            assert existing is not None
            if duplicate == "conversation_address":
                session.add(
                    Conversation(
                        channel="sms", remote_address="+15550000001", local_address="+15559990000"
                    )
                )
            elif duplicate == "provider_message_id":
                session.add(
                    Message(
                        conversation_id=first,
                        channel="sms",
                        sender="user",
                        provider_message_id="SM-+15550000001",
                        status="received",
                    )
                )
            elif duplicate == "conversation_url":
                session.add(
                    Conversation(
                        channel="email",
                        remote_address="a@example.com",
                        local_address="b@example.com",
                        conversation_url=existing.conversation_url,
                    )
                )
            else:
                message_id = (
                    await session.scalars(
                        select(Message.id).where(Message.conversation_id == first)
                    )
                ).one()
                session.add(ReplyJob(conversation_id=first, message_id=message_id))


async def test_the_same_provider_id_on_another_channel_is_another_message(
    engine: AsyncEngine,
) -> None:
    first = await _conversation_with_everything(engine, "+15550000001")
    async with session_factory(engine).begin() as session:
        session.add(
            Message(
                conversation_id=first,
                channel="email",
                sender="user",
                provider_message_id="SM-+15550000001",
                status="received",
            )
        )


async def test_conversation_urls_are_long_and_distinct(engine: AsyncEngine) -> None:
    ids = [await _conversation_with_everything(engine, f"+1555000000{i}") for i in range(5)]
    async with engine.connect() as connection:
        urls = (
            (
                await connection.execute(
                    select(Conversation.conversation_url).where(Conversation.id.in_(ids))
                )
            )
            .scalars()
            .all()
        )
    assert len(set(urls)) == 5
    assert all(len(u) >= 43 for u in urls)  # 32 random bytes, base64url: 256 bits


async def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(
    engine: AsyncEngine,
) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite pragmas")
    async with engine.connect() as connection:
        pragmas = {
            name: (await connection.exec_driver_sql(f"PRAGMA {name}")).scalar()
            for name in ("journal_mode", "foreign_keys", "busy_timeout")
        }
    assert pragmas["journal_mode"] == "wal"
    assert pragmas["foreign_keys"] == 1
    assert int(pragmas["busy_timeout"]) >= 5000


async def test_postgresql_ends_a_session_left_idle_inside_a_transaction(
    database_url: str,
) -> None:
    """A frozen process's open transaction (its row locks hide jobs from every other worker's
    requeue) is ended by PostgreSQL after 10 s, on every connection Parley opens."""
    if not database_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL session setting")
    assert await _shown(create_engine(database_url)) == ("10s", "")
    caller = {"server_settings": {"application_name": "parley-test"}}
    assert await _shown(create_engine(database_url, connect_args=caller)) == ("10s", "parley-test")
    assert caller == {"server_settings": {"application_name": "parley-test"}}  # not changed
    # DB_IDLE_IN_TRANSACTION_S=0 (behind PgBouncer, which refuses the startup parameter).
    assert await _shown(create_engine(database_url, idle_in_transaction_s=0)) == ("0", "")


async def _shown(engine: AsyncEngine) -> tuple[str, str]:
    try:
        async with engine.connect() as connection:
            timeout = await connection.scalar(text("SHOW idle_in_transaction_session_timeout"))
            name = await connection.scalar(text("SHOW application_name"))
    finally:
        await engine.dispose()
    return str(timeout), str(name)


async def test_two_processes_migrating_at_once_do_not_collide(database_url: str) -> None:
    """Replicas start together: the advisory lock lets one migrate while the other waits."""
    if not database_url.startswith("postgresql"):
        pytest.skip("the advisory lock is PostgreSQL's; SQLite has one writer anyway")
    first, second = create_engine(database_url), create_engine(database_url)
    try:
        async with first.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                await connection.execute(text(f"DROP TABLE {table.name}"))
            await connection.execute(text("DROP TABLE alembic_version"))
        async with asyncio.timeout(30):  # without the lock they deadlock or collide
            await asyncio.gather(upgrade(first), upgrade(second))
        assert await current_revision(first) == head_revision()
    finally:
        await first.dispose()
        await second.dispose()


def _downgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


async def test_media_urls_kept_in_old_headers_move_to_the_media_column(
    engine: AsyncEngine,
) -> None:
    """Before revision 7c41e2a9d0f3 an MMS kept its URLs (no types) in `headers["meta"]`."""
    url = "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1"
    async with engine.begin() as connection:
        await connection.run_sync(_downgrade, "7c1e5a9d2f40")
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO conversation (id, channel, remote_address, local_address,"
                " created_at, updated_at, summary, conversation_url, opted_out, paused)"
                " VALUES (1, 'sms', '+15550001111', '+15559990000', :now, :now, '', 'tok',"
                " false, false)"
            ),
            {"now": dt.datetime(2026, 12, 1)},
        )
        for id_, headers in ((1, {"meta": {"media": [url]}}), (2, None)):
            await connection.execute(
                text(
                    "INSERT INTO message (id, conversation_id, created_at, updated_at, channel,"
                    " sender, intent, body, provider_message_id, headers, status)"
                    " VALUES (:id, 1, :now, :now, 'sms', 'user', 'message', '', :sid,"
                    " :headers, 'answered')"
                ),
                {
                    "id": id_,
                    "now": dt.datetime(2026, 12, 1),
                    "sid": f"MM{id_}",
                    "headers": None if headers is None else json.dumps(headers),
                },
            )
    await upgrade(engine)
    async with engine.connect() as connection:
        rows = (await connection.execute(select(Message).order_by(Message.id))).all()
    assert [(row.headers, row.media) for row in rows] == [
        (
            None,
            [
                {
                    "url": url,
                    "content_type": "application/octet-stream",
                    "size": None,
                    "state": "declared",
                }
            ],
        ),
        (None, None),
    ]
