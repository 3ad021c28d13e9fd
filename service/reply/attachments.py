"""The messages being answered as the model's new turns, with their attachments (SPEC §10).

Each attachment is fetched through its channel (`ChannelPlugin.fetch_attachments`: for
Twilio, Basic auth, redirects, `MEDIA_MAX_BYTES`, its media host only) right before the model
call. What was learned (size, state) is stored on the message for the transcript, the API and
later turns' notes; the bytes live only in this call's prompt. Images go to the model when
`ASSISTANT_VISION` is on, everything else as a note (`media.arriving_turn`).

Pictures cost memory from their fetch to the end of the model call (their bytes, then ~2.4x
the prompt's share as base64 and JSON), so a job takes what it may hold from the process's
`MEDIA_MEMORY_BYTES` (64 MiB) first (`held_for`) and keeps only what its prompt carries
once fetched: fifty people sending ten 5 MB photos at once wait their turn instead of taking
~4 GB.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from service.byte_budget import ByteBudget, Held
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
        self._item_bytes = context.settings.media_max_bytes
        self.memory = ByteBudget(context.settings.media_memory_bytes)

    def held_for(self, messages: Sequence[Waiting]) -> contextlib.AbstractAsyncContextManager[Held]:
        """The most the messages' pictures can hold at once, from the process's budget: the
        messages are fetched one after another, each with all its items at once, and the
        prompt keeps at most `PROMPT_IMAGE_BYTES` of what came before."""
        counts = [sum(map(self._wants_content, m.media)) for m in messages]
        largest = max(counts, default=0) * self._item_bytes
        return self.memory.held(min(sum(counts) * self._item_bytes, largest + PROMPT_IMAGE_BYTES))

    async def new_turns(
        self, channel: Channel, messages: Sequence[Waiting], held: Held
    ) -> list[Turn]:
        """One user turn per message, in order, the prompt's images within
        `PROMPT_IMAGE_BYTES` (`held`, from `held_for`, then keeps what they take); `RetryLater`
        when the provider could not hand an attachment over now (5xx, timeout)."""
        turns: list[Turn] = []
        budget = PROMPT_IMAGE_BYTES
        for message in messages:
            turn, budget = await self._turn(channel, message, budget)
            turns.append(turn)
        held.keep(PROMPT_IMAGE_BYTES - budget)
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
