"""The tables. Every one has `created_at`; every foreign key and lookup column is indexed.

Deleting a conversation deletes its messages, assistant-call records and jobs, both through the
ORM (`cascade="all, delete-orphan"`) and in the database (`ON DELETE CASCADE`), so a bulk
`DELETE` issued without the ORM (`parley forget`) leaves nothing behind either.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.db import utcnow

# Stable constraint names, so migrations can refer to them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER keys only
LEASE_OWNER_CHARS = 64  # `ReplyJob.lease_owner`: a worker's id must fit (see `worker_id`)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes in Python; `timestamptz` on PostgreSQL, naive UTC text on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        moment: dt.datetime = value
        return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def new_conversation_url() -> str:
    """256 bits from `secrets`: unguessable, URL-safe."""
    return secrets.token_urlsafe(32)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Conversation(Base):
    __tablename__ = "conversation"
    __table_args__ = (UniqueConstraint("channel", "remote_address", "local_address"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    channel: Mapped[str] = mapped_column(String(16))
    remote_address: Mapped[str] = mapped_column(String(320), index=True)
    local_address: Mapped[str] = mapped_column(String(320), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(
        UTCDateTime, default=utcnow, onupdate=utcnow, index=True
    )
    summary: Mapped[str] = mapped_column(String(50), default="")
    conversation_url: Mapped[str] = mapped_column(
        String(64), unique=True, default=new_conversation_url
    )
    opted_out: Mapped[bool] = mapped_column(Boolean, default=False)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    # What the person calls themselves, where the channel says (WhatsApp's ProfileName);
    # the latest one wins.
    display_name: Mapped[str | None] = mapped_column(String(255))
    # Without PUBLIC_BASE_URL: the scheme and host its provider's last signed webhook came to,
    # where delivery callbacks are sent ("derived from the request", SPEC §3).
    public_base_url: Mapped[str | None] = mapped_column(String(255))
    # Summary memory (SPEC §12): the model's rolling summary of the turns before, and up to,
    # message `memory_through_id`; later prompts read only the messages after it.
    memory_summary: Mapped[str | None] = mapped_column(Text)
    memory_through_id: Mapped[int | None] = mapped_column(Id)
    # The closed period (`profiles.Hours.closed_period`) whose after-hours reply went out.
    after_hours_period: Mapped[str | None] = mapped_column(String(40))

    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Message.id",
    )
    assistant_calls: Mapped[list[AssistantCall]] = relationship(
        back_populates="conversation",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="AssistantCall.id",
    )
    jobs: Mapped[list[ReplyJob]] = relationship(
        back_populates="conversation",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class Message(Base):
    """One message either way. `status` is an `InboundState` for the user's messages and a
    `Delivery` for the assistant's."""

    __tablename__ = "message"
    __table_args__ = (
        UniqueConstraint("channel", "provider_message_id"),
        # A reply's state read asks when the person last wrote: one index seek, however long
        # the conversation (it runs on the event loop's thread: `db.inline`).
        Index("ix_message_conversation_sender_time", "conversation_id", "sender", "created_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversation.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    channel: Mapped[str] = mapped_column(String(16))
    sender: Mapped[str] = mapped_column(String(16))
    author: Mapped[str | None] = mapped_column(String(16))
    # For a fixed text (author `fixed`): which one, a `types.FixedText`.
    fixed_kind: Mapped[str | None] = mapped_column(String(16))
    intent: Mapped[str] = mapped_column(String(16), default="message")
    body: Mapped[str] = mapped_column(Text, default="")
    # Which part of its reply an assistant's message is, from 1 (a reply longer than its
    # channel's limit is stored cut into parts): WhatsApp's template stands for a whole reply.
    part: Mapped[int] = mapped_column(SmallInteger, default=1, server_default="1")
    provider_message_id: Mapped[str | None] = mapped_column(String(255))
    subject: Mapped[str | None] = mapped_column(Text)
    headers: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The user's attachments (`types.MediaItem.to_json`, in order): URL, type, size once
    # fetched, state. Never their bytes.
    media: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    reply_to_id: Mapped[int | None] = mapped_column(
        ForeignKey("message.id", ondelete="SET NULL"), index=True
    )
    attempted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")


class AssistantCall(Base):
    """One call to the model: what was asked, what it cost, how long it took, how it ended."""

    __tablename__ = "assistant_call"
    # The rate limit counts a conversation's recent calls: a range, not all its calls.
    __table_args__ = (
        Index("ix_assistant_call_conversation_time", "conversation_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversation.id", ondelete="CASCADE"), index=True
    )
    message_id: Mapped[int | None] = mapped_column(
        ForeignKey("message.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    model: Mapped[str] = mapped_column(String(255))
    # "reply" (the answer to the person) or "summary" (folding old turns, never sent).
    purpose: Mapped[str] = mapped_column(String(16), default="reply", server_default="reply")
    generation_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    processing_time: Mapped[int] = mapped_column(Integer, default=0)  # milliseconds
    status: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    total_tokens: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)

    conversation: Mapped[Conversation] = relationship(back_populates="assistant_calls")


class DeliveryReport(Base):
    """A provider's status callback for a message id not stored yet: callbacks can beat the
    send's own answer. Applied, then deleted, when the send is recorded."""

    __tablename__ = "delivery_report"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    channel: Mapped[str] = mapped_column(String(16))
    provider_message_id: Mapped[str] = mapped_column(String(255), index=True)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)


class ReplyJob(Base):
    """Pending work for one message: the only truth about what the worker still owes."""

    __tablename__ = "reply_job"
    __table_args__ = (
        Index("ix_reply_job_due", "status", "run_after"),
        # A conversation's queued jobs (the debounce, a claim): not every job it ever had.
        Index("ix_reply_job_conversation_status", "conversation_id", "status"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversation.id", ondelete="CASCADE"), index=True
    )
    message_id: Mapped[int] = mapped_column(
        ForeignKey("message.id", ondelete="CASCADE"), unique=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_after: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(LEASE_OWNER_CHARS), index=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="jobs")


class ModelCallWindow(Base):
    """`MODEL_CALLS_LIMIT`'s ledger: model calls started in one fixed window, deployment-wide.
    Every process takes its place by one conditional UPDATE of this row (service/store/budget.py),
    so the count is exact across processes. Keyed by the window's length too, so a changed
    limit starts its own windows."""

    __tablename__ = "model_call_window"

    window_s: Mapped[int] = mapped_column(Integer, primary_key=True)
    window_start: Mapped[dt.datetime] = mapped_column(UTCDateTime, primary_key=True)
    calls: Mapped[int] = mapped_column(Integer, default=0)
    warned_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)  # first refusal
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
