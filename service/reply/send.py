"""Sending what a conversation owes: its unsent parts in order, each moved `pending ->
sending` by compare-and-set before the provider is called; a part found in `sending` after a
crash is looked up at the provider before it is sent again; replies the conversation no longer
allows (opted out, paused) are withheld."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from service import metrics
from service.channels.base import ChannelPlugin, LookupUnsupported
from service.reply.flow import GiveUp, Outcome, RetryLater, Withheld
from service.store import AsyncEngine, conversations, outbox
from service.store.conversations import ConversationView
from service.store.outbox import Part
from service.types import Author, Channel, Delivery, Outbound, RecipientOptedOut, SendError

log = logging.getLogger(__name__)


class PartSender:
    def __init__(self, engine: AsyncEngine, channels: Mapping[Channel, ChannelPlugin]) -> None:
        self._engine = engine
        self._channels = channels

    async def send_unsent(self, conversation: ConversationView) -> Outcome | None:
        """Send every unsent part of the conversation in order. Returns why it stopped early
        (opted out, withheld), or None once all went out."""
        for part in await outbox.unsent_parts(self._engine, conversation.id):
            try:
                await self._send_part(conversation, part)
            except RecipientOptedOut as exc:
                log.warning(
                    "conversation %s: provider says the recipient opted out", conversation.id
                )
                await self._fail_unsent(conversation.id, str(exc), opted_out=True)
                return Outcome.OPTED_OUT
            except Withheld as withheld:
                log.info(
                    "conversation %s: unsent replies withheld (%s)",
                    conversation.id,
                    withheld.reason,
                )
                await self._fail_unsent(
                    conversation.id, withheld.reason, model_only=withheld.model_only
                )
                return Outcome.WITHHELD
        return None

    async def _send_part(self, conversation: ConversationView, part: Part) -> None:
        channel = self._channels[Channel(conversation.channel)]
        outbound = Outbound(
            channel=Channel(conversation.channel),
            to=conversation.remote_address,
            from_=conversation.local_address,
            body=part.body,
            subject=part.subject,
            headers=part.headers,
            last_inbound_at=conversation.last_inbound_at,
        )
        if not channel.can_send:
            await self._not_sent(conversation, part)
            return
        if part.status == Delivery.SENDING.value and part.attempted_at is not None:
            if await self._already_sent(channel, outbound, part):
                return
        elif not await outbox.start_sending(self._engine, part):
            await self._why_not_sendable(part)
            return  # another process holds this part
        await self._call_provider(channel, outbound, part)

    async def _call_provider(self, channel: ChannelPlugin, outbound: Outbound, part: Part) -> None:
        sending = time.perf_counter()
        try:
            result = await channel.send(outbound)
        except SendError as exc:
            metrics.observe_send(part.channel, time.perf_counter() - sending, exc.retryable)
            if isinstance(exc, RecipientOptedOut):
                raise
            await self._after_send_error(part, exc)
            raise AssertionError("unreachable") from exc
        metrics.observe_send(part.channel, time.perf_counter() - sending)
        metrics.count_replies("sent")
        if result.provider_message_id:
            await outbox.record_sent(
                self._engine, part.id, part.channel, result.provider_message_id, result.status
            )
        else:
            await outbox.set_status(self._engine, part.id, result.status)

    async def _not_sent(self, conversation: ConversationView, part: Part) -> None:
        await outbox.set_status(self._engine, part.id, Delivery.NOT_SENT)
        metrics.count_replies("not_sent")
        log.info(
            "reply %s in conversation %s not sent: no %s credentials configured",
            part.id,
            conversation.id,
            conversation.channel,
        )

    async def _already_sent(self, channel: ChannelPlugin, outbound: Outbound, part: Part) -> bool:
        """A part left in `sending` may have gone out: ask the provider before sending again."""
        assert part.attempted_at is not None
        try:
            candidates = await channel.find_sent(outbound, part.attempted_at)
        except LookupUnsupported:
            return False
        except Exception as exc:
            raise RetryLater(f"could not check whether reply {part.id} went out: {exc}") from exc
        sid = await outbox.first_unrecorded(self._engine, part.channel, candidates)
        if sid is None:
            return False
        log.info("reply %s had gone out before (%s): not sending it again", part.id, sid)
        await outbox.record_sent(self._engine, part.id, part.channel, sid, Delivery.QUEUED)
        return True

    async def _after_send_error(self, part: Part, exc: SendError) -> None:
        if exc.retryable:
            if not exc.ambiguous:  # surely not sent: the next try sends without looking
                await outbox.set_status(self._engine, part.id, Delivery.PENDING)
            raise RetryLater(str(exc), exc.retry_after_s) from exc
        await self._fail_unsent(part.conversation_id, str(exc))
        raise GiveUp(str(exc)) from exc

    async def _why_not_sendable(self, part: Part) -> None:
        """After a lost compare-and-set: raise `Withheld` if the conversation forbids sending."""
        conversation = await conversations.find_conversation(self._engine, part.conversation_id)
        if conversation is None or conversation.opted_out:
            raise Withheld("recipient opted out", model_only=False)
        if conversation.paused and part.author == Author.MODEL.value:
            raise Withheld("withheld: the conversation was paused", model_only=True)

    async def _fail_unsent(
        self, conversation_id: int, error: str, *, model_only: bool = False, opted_out: bool = False
    ) -> None:
        _, failed = await outbox.fail_unsent(
            self._engine, conversation_id, error, model_only=model_only, opted_out=opted_out
        )
        metrics.count_replies("failed", failed)
