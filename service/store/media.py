"""What the worker learned of a message's attachments (size, state), written back to the
message: the transcript and the API show it, and later turns' notes are made from it."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from service.models import Message
from service.types import MediaItem


async def record_media(engine: AsyncEngine, message_id: int, media: Sequence[MediaItem]) -> None:
    """Replace the message's media list with what the fetch found (never any bytes)."""
    async with engine.begin() as connection:
        await connection.execute(
            update(Message)
            .where(Message.id == message_id)
            .values(media=[item.to_json() for item in media] or None)
        )
