"""Sending what a conversation owes: its unsent parts in order, each moved `pending ->
sending` by compare-and-set before the provider is called; a part found in `sending` after a
crash is looked up at the provider before it is sent again, and resent only after a
compare-and-set of its own takes it over; replies the conversation no longer allows (opted
out, paused) are withheld. A compare-and-set lost to another worker stops the job
(`Superseded`): the parts after it are not sent ahead of it.

Each send is recorded in one transaction together with the next part's compare-and-set, or,
after the last part, with the end of the job (`outbox.Then`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

from service import metrics
from service.channels.base import ChannelPlugin, LookupUnsupported
from service.queue.manager import Claim
from service.reply.flow import GiveUp, Outcome, RetryLater, Superseded, Withheld
from service.store import AsyncEngine, conversations, outbox
from service.store.conversations import ConversationView
from service.store.outbox import Part, Then
from service.types import Author, Channel, Delivery, Outbound, RecipientOptedOut, SendError

log = logging.getLogger(__name__)


class PartSender:
    def __init__(self, engine: AsyncEngine, channels: Mapping[Channel, ChannelPlugin]) -> None:
        self._engine = engine
        self._channels = channels

    async def send(
        self, conversation: ConversationView, parts: Sequence[Part], finish: Claim | None = None
    ) -> Outcome | None:
        """Send these parts in order; the last one's record also finishes `finish`'s jobs.
        Returns why it stopped early (opted out, withheld), or None once all went out."""
        held: Part | None = None  # the next part, when the last transaction took it
        for index, listed in enumerate(parts):
            part = held or listed
            following = parts[index + 1] if index + 1 < len(parts) else None
            then = Then(next_part=following) if following else Then(finish=finish)
            try:
                held = await self._send_part(conversation, part, then)
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

    async def _send_part(
        self, conversation: ConversationView, part: Part, then: Then
    ) -> Part | None:
        """Send one part (or find it sent); returns the next part when `then` took it."""
        channel = self._channels[Channel(conversation.channel)]
        outbound = Outbound(
            channel=Channel(conversation.channel),
            to=conversation.remote_address,
            from_=conversation.local_address,
            body=part.body,
            subject=part.subject,
            headers=part.headers,
            last_inbound_at=conversation.last_inbound_at,
            part=part.number,
            reached_at=conversation.public_base_url,
        )
        if not channel.can_send:
            return await self._not_sent(conversation, part, then)
        if part.held:
            pass  # this job moved it to `sending` in its last transaction
        elif part.status == Delivery.SENDING.value and part.attempted_at is not None:
            if (sent := await self._already_sent(channel, outbound, part)) is not None:
                return await outbox.record_sent(
                    self._engine, part.id, part.channel, sent, Delivery.QUEUED, then
                )
            if not await outbox.take_over(self._engine, part):
                await self._why_not_sendable(part)
                raise Superseded(f"reply {part.id} was taken over by another worker")
        elif not await outbox.start_sending(self._engine, part):
            await self._why_not_sendable(part)
            raise Superseded(f"reply {part.id} is held by another worker")
        return await self._call_provider(channel, outbound, part, then)

    async def _call_provider(
        self, channel: ChannelPlugin, outbound: Outbound, part: Part, then: Then
    ) -> Part | None:
        sending = time.perf_counter()
        try:
            result = await channel.send(outbound)
        except SendError as exc:
            metrics.observe_send(part.channel, time.perf_counter() - sending, exc.retryable)
            if isinstance(exc, RecipientOptedOut):
                raise
            await self._after_send_error(part, exc)
            raise AssertionError("unreachable") from exc
        if result.status is Delivery.NOT_SENT:  # the channel chose not to (WhatsApp's template)
            metrics.count_replies("not_sent")
            return await outbox.set_status(
                self._engine, part.id, result.status, then, note=result.note
            )
        metrics.observe_send(part.channel, time.perf_counter() - sending)
        metrics.count_replies("sent")
        if result.provider_message_id:
            return await outbox.record_sent(
                self._engine, part.id, part.channel, result.provider_message_id, result.status, then
            )
        return await outbox.set_status(self._engine, part.id, result.status, then)

    async def _not_sent(
        self, conversation: ConversationView, part: Part, then: Then
    ) -> Part | None:
        held = await outbox.set_status(self._engine, part.id, Delivery.NOT_SENT, then)
        metrics.count_replies("not_sent")
        log.info(
            "reply %s in conversation %s not sent: no %s credentials configured",
            part.id,
            conversation.id,
            conversation.channel,
        )
        return held

    async def _already_sent(
        self, channel: ChannelPlugin, outbound: Outbound, part: Part
    ) -> str | None:
        """A part left in `sending` may have gone out: ask the provider before sending again.
        Returns the provider's id of the send found, or None."""
        assert part.attempted_at is not None
        try:
            candidates = await channel.find_sent(outbound, part.attempted_at)
        except LookupUnsupported:
            return None
        except Exception as exc:
            raise RetryLater(f"could not check whether reply {part.id} went out: {exc}") from exc
        sid = await outbox.first_unrecorded(self._engine, part.channel, candidates)
        if sid is not None:
            log.info("reply %s had gone out before (%s): not sending it again", part.id, sid)
        return sid

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
