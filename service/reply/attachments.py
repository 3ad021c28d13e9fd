"""The messages being answered as the model's new turns, with their attachments (SPEC §10).

Each attachment is fetched through its channel (`ChannelPlugin.fetch_attachments`: for
Twilio, Basic auth, redirects, `MEDIA_MAX_BYTES`, its media host only) right before the model
call. What was learned (size, state) is stored on the message for the transcript, the API and
later turns' notes; the bytes live only in this call's prompt. Images go to the model when
`ASSISTANT_VISION` is on, everything else as a note (`media.arriving_turn`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from service.channels.base import FetchFailed
from service.media import PROMPT_IMAGE_BYTES, arriving_turn, is_image
from service.reply.flow import ReplyContext, RetryLater
from service.store import media as media_store
from service.store.conversations import Waiting
from service.types import Channel, MediaItem, Sender, Turn


class Attachments:
    def __init__(self, context: ReplyContext) -> None:
        self._engine = context.engine
        self._channels = context.channels
        self._vision = context.settings.assistant_vision

    async def new_turns(self, channel: Channel, messages: Sequence[Waiting]) -> list[Turn]:
        """One user turn per message, in order, the prompt's images within
        `PROMPT_IMAGE_BYTES`; `RetryLater` when the provider could not hand an attachment
        over now (5xx, timeout)."""
        turns: list[Turn] = []
        budget = PROMPT_IMAGE_BYTES
        for message in messages:
            turn, budget = await self._turn(channel, message, budget)
            turns.append(turn)
        return turns

    async def _turn(self, channel: Channel, message: Waiting, budget: int) -> tuple[Turn, int]:
        if not message.media:
            return Turn(Sender.USER, message.body), budget
        try:
            fetched = await self._channels[channel].fetch_attachments(
                message.media, self._wants_content
            )
        except FetchFailed as exc:
            raise RetryLater(str(exc), exc.retry_after_s) from exc
        learned = [attachment.item for attachment in fetched]
        if learned != list(message.media):
            await media_store.record_media(self._engine, message.id, learned)
        # Base64 of megabytes, in a thread: the loop serves webhooks between the images.
        return await asyncio.to_thread(
            arriving_turn, message.body, [(a.item, a.content) for a in fetched], budget
        )

    def _wants_content(self, item: MediaItem) -> bool:
        """Only images the model will look at are read whole; other items need their size."""
        return self._vision and is_image(item.content_type)
