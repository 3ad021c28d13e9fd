"""The channels this deployment runs, built once from settings: the web app mounts their
routes and labels their metrics, the worker sends through them, the CLI asks them how an
address is written and what a channel is called."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from service.channels.base import BadAddress, ChannelPlugin, WebhookRoute
from service.channels.sendgrid.email import SendGridEmail
from service.channels.twilio.base import TwilioChannel
from service.channels.twilio.media import TwilioMedia
from service.channels.twilio.sms import TwilioSms
from service.channels.twilio.whatsapp import TwilioWhatsApp
from service.settings import Settings
from service.types import Channel

# Every channel Parley has, built in this order; asked in this order for an address
# (`normalise_address`): the first that claims it wins.
PLUGINS: tuple[type[TwilioChannel] | type[SendGridEmail], ...] = (
    TwilioSms,
    TwilioWhatsApp,
    SendGridEmail,
)


class Channels(Mapping[Channel, ChannelPlugin]):
    """Channel -> plugin, plus the questions asked across channels."""

    def __init__(self, plugins: list[ChannelPlugin]) -> None:
        self._plugins = {plugin.channel: plugin for plugin in plugins}

    def __getitem__(self, channel: Channel) -> ChannelPlugin:
        return self._plugins[channel]

    def __iter__(self) -> Iterator[Channel]:
        return iter(self._plugins)

    def __len__(self) -> int:
        return len(self._plugins)

    def routes(self) -> list[tuple[ChannelPlugin, WebhookRoute]]:
        """Every plugin's webhooks, with the plugin that owns each (its metric label)."""
        return [(plugin, route) for plugin in self.values() for route in plugin.routes()]

    def normalise_address(self, text: str) -> str:
        """A remote address as stored (`parley forget`): asks each plugin in turn; `BadAddress`
        if the one that claims it finds it unusable, or none claims it."""
        for plugin in self.values():
            address = plugin.normalise_address(text)
            if address is not None:
                return address
        raise BadAddress(f"not an address of any channel: {text.strip()!r}")

    def display_name(self, channel: str | Channel) -> str:
        """What a person calls the channel ("SMS", "Email"); an unknown value as it is."""
        try:
            return self._plugins[Channel(channel)].display_name
        except (ValueError, KeyError):
            return str(channel)

    async def close(self) -> None:
        for plugin in self.values():
            await plugin.close()


def build_channels(settings: Settings) -> Channels:
    media = TwilioMedia(settings)  # one media HTTP client for every Twilio channel
    plugins: list[ChannelPlugin] = [
        plugin(settings, media) if issubclass(plugin, TwilioChannel) else plugin(settings)
        for plugin in PLUGINS
    ]
    return Channels(plugins)
