"""Provider webhooks: each plugin's routes, mounted with what every webhook shares.

The plugin reads, authenticates and parses its provider's request; here a refusal becomes one
warning line, a metric and a 4xx/503, and the `Intake` a plugin is handed turns its parsed
message into one committed row with its reply job. No model or provider call happens here:
the reply is the worker's. A 2xx goes out only after the message and its reply job are
committed, so an acknowledged message is never lost.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service import metrics, storable
from service.channels.base import ChannelPlugin, Refused, StatusUpdate, WebhookRoute
from service.channels.registry import Channels
from service.store.conversations import is_stored, recent_replies
from service.store.errors import StorageFailure, storage_errors
from service.store.inbound import Recorded
from service.store.outbox import update_delivery
from service.types import Inbound

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]


class _Intake:
    """`channels.base.Intake` for one request to one plugin's route: stores what the plugin
    parsed, counts it under the plugin's channel and logs it with the request's duration."""

    def __init__(self, request: Request, plugin: ChannelPlugin, route: WebhookRoute) -> None:
        self._services = request.app.state.services
        self._channel = plugin.channel
        self._kind = route.kind
        self.started = time.perf_counter()

    def elapsed_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)

    def count(self, result: str) -> None:
        metrics.count_webhook(self._channel.value, self._kind, result)

    async def record(self, inbound: Inbound) -> None:
        """Hand the message to the inbound writer and wait for its commit; count and log it."""
        try:
            recorded: Recorded = await self._services.writer.record(inbound)
        except storable.Unstorable as exc:
            raise Refused(400, str(exc)) from exc
        except StorageFailure as exc:
            raise Refused(exc.status, str(exc)) from exc
        metrics.count_inbound(inbound.channel.value, recorded.duplicate, recorded.enqueued)
        if recorded.duplicate:
            outcome = "duplicate"
        else:
            outcome = "enqueued" if recorded.enqueued else f"stored ({inbound.intent})"
        log.info(
            "webhook %s conversation=%s message=%s outcome=%s duration_ms=%d",
            inbound.channel,
            recorded.conversation_id or "-",
            recorded.message_id or "-",
            outcome,
            self.elapsed_ms(),
        )

    async def update_delivery(self, update: StatusUpdate) -> bool:
        channel = update.channel or self._channel  # one Twilio status route serves several
        with _refused_on_storage_failure():
            moved = await update_delivery(
                self._services.engine,
                channel.value,
                update.provider_message_id,
                update.status,
                update.error,
            )
        metrics.count_webhook(channel.value, self._kind, "applied" if moved else "ignored")
        log.info(
            "webhook status sid=%s status=%s applied=%s duration_ms=%d",
            update.provider_message_id,
            update.status,
            moved,
            self.elapsed_ms(),
        )
        return moved

    async def is_stored(self, provider_message_id: str) -> bool:
        stored_id = storable.provider_id(provider_message_id)  # as the writer stores it
        with _refused_on_storage_failure():
            if not await is_stored(self._services.engine, self._channel.value, stored_id):
                return False
        metrics.count_inbound(self._channel.value, duplicate=True, enqueued=False)
        log.info(
            "webhook %s message=%s outcome=duplicate duration_ms=%d",
            self._channel,
            provider_message_id[:80],
            self.elapsed_ms(),
        )
        return True

    async def recent_replies(self, remote_address: str, local_address: str) -> list[str]:
        with _refused_on_storage_failure():
            return await recent_replies(
                self._services.engine, self._channel.value, remote_address, local_address
            )


@contextlib.contextmanager
def _refused_on_storage_failure() -> Iterator[None]:
    """A database that fails a read or an update is a 503 (the provider retries), or a 400 for
    a value it refuses: the refusal the writer's failures give too."""
    try:
        with storage_errors():
            yield
    except StorageFailure as exc:
        raise Refused(exc.status, str(exc)) from exc


def _endpoint(plugin: ChannelPlugin, route: WebhookRoute) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        intake = _Intake(request, plugin, route)
        try:
            return await route.handler(request, intake)
        except Refused as refused:
            intake.count(metrics.refusal_result(refused.status))
            log.warning(
                "webhook %s refused: %s status=%d duration_ms=%d",
                request.url.path,
                refused.reason,
                refused.status,
                intake.elapsed_ms(),
            )
            return Response(
                refused.reason + "\n",
                status_code=refused.status,
                media_type="text/plain",
                headers=refused.headers,
            )

    return endpoint


def routes(channels: Channels) -> list[Route]:
    """Every plugin's webhooks, each at `path` and at `path/`, answered alike: providers do not
    follow redirects (SendGrid drops the mail), and an operator may configure either form. The
    handler sees the URL as requested, so Twilio's signature is checked against what Twilio
    signed."""
    return [
        Route(path, _endpoint(plugin, route), methods=["POST"])
        for plugin, route in channels.routes()
        for path in (route.path, f"{route.path}/")
    ]
