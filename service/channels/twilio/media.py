"""Fetching a Twilio message's media (MMS, WhatsApp) for the model, SPEC §10.

Only URLs on the origin of `TWILIO_API_BASE_URL` (Twilio's own media URLs) are fetched, with
HTTP Basic auth (the account SID and the first auth token). Twilio answers them with a
redirect to its CDN; a redirect is followed only to that same origin (credentials kept) or to
one of `TWILIO_MEDIA_REDIRECT_HOSTS` over https (credentials dropped), never elsewhere. A body
is read in chunks and abandoned at `MEDIA_MAX_BYTES`, so an over-sized item is never
downloaded past the limit. A 4xx is final (the item is unavailable); a 5xx, a connection
failure or a timeout raises `FetchFailed`, and the reply job is retried like any provider
failure. One HTTP client (httpx2, which the openai SDK already loads) serves every Twilio
channel of a process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from service.channels.base import Attachment, FetchFailed
from service.retry import is_retryable_status, retry_after_seconds
from service.settings import Settings
from service.types import MediaItem, MediaState

if TYPE_CHECKING:
    import httpx2  # imported on the first fetch: an idle process does not load it

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
CHUNK_BYTES = 64 * 1024
REDIRECTS = frozenset({301, 302, 303, 307, 308})


# ---------------------------------------------------------------- the host rules (pure)


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port made explicit; an unparsable URL
    (`https://[::1/x`) has no origin, so it is on no allowed host."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or {"https": 443, "http": 80}.get(scheme)
    except ValueError:
        return "", "", None
    return scheme, (parts.hostname or "").lower(), port


def on_media_host(url: str, api_base_url: str) -> bool:
    """Whether `url` is one of Twilio's media URLs: on the origin of `TWILIO_API_BASE_URL`."""
    return origin(url)[0] in ("http", "https") and origin(url) == origin(api_base_url)


@dataclass(frozen=True)
class Hop:
    """Where a redirect leads, and whether the credentials may go along."""

    url: str
    credentials: bool


def follow(
    current: str, location: str, api_base_url: str, redirect_hosts: Sequence[str]
) -> Hop | None:
    """The next hop of a redirect from `current`, or None when it leads off the allowed hosts:
    the API's own origin keeps the credentials; a CDN host (https only) gets none."""
    try:
        target = urljoin(current, location.strip())
    except ValueError:
        return None
    if on_media_host(target, api_base_url):
        return Hop(target, credentials=True)
    scheme, host, _ = origin(target)
    if scheme == "https" and any(fnmatch.fnmatchcase(host, p) for p in redirect_hosts):
        return Hop(target, credentials=False)
    return None


def redirect_hosts(setting: str) -> tuple[str, ...]:
    return tuple(p.strip().lower() for p in setting.split(",") if p.strip())


# ---------------------------------------------------------------- fetching


class TwilioMedia:
    """The media fetcher of every Twilio channel of a process (one HTTP client, made on first
    use inside the running event loop)."""

    def __init__(self, settings: Settings) -> None:
        tokens = settings.twilio_auth_tokens
        self._auth = (
            (settings.twilio_account_sid, tokens[0])  # HTTP Basic
            if settings.twilio_account_sid and tokens
            else None
        )
        self._api_base_url = settings.twilio_api_base_url
        self._redirect_hosts = redirect_hosts(settings.twilio_media_redirect_hosts)
        self._max_bytes = settings.media_max_bytes
        self._timeout_s = settings.media_timeout_s
        self._client: httpx2.AsyncClient | None = None

    def _http(self) -> httpx2.AsyncClient:
        import httpx2

        if self._client is None:
            self._client = httpx2.AsyncClient(
                follow_redirects=False,  # each hop is checked by `follow`
                timeout=httpx2.Timeout(self._timeout_s, connect=min(self._timeout_s, 5.0)),
                limits=httpx2.Limits(max_connections=32, max_keepalive_connections=8),
                trust_env=False,
            )
        return self._client

    async def fetch(
        self, media: Sequence[MediaItem], want_content: Callable[[MediaItem], bool]
    ) -> list[Attachment]:
        """Every item at once, in the given order; `FetchFailed` if any is worth a retry (the
        others are cancelled: the whole message is fetched again on the next try)."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._one(m, want_content(m))) for m in media]
        except* FetchFailed as failed:
            raise failed.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _one(self, item: MediaItem, with_content: bool) -> Attachment:
        import httpx2

        if self._auth is None or not on_media_host(item.url, self._api_base_url):
            # Without the account's credentials there is no Twilio to fetch from (the laptop
            # mode): retrying an unreachable media host for every try would only delay the reply.
            return Attachment(dataclasses.replace(item, state=MediaState.NOT_FETCHED))
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._get(item, with_content)
        except (TimeoutError, httpx2.TimeoutException):
            raise FetchFailed(f"media fetch timed out after {self._timeout_s:g} s") from None
        except httpx2.InvalidURL:  # a URL only the HTTP client finds malformed: not retryable
            return Attachment(dataclasses.replace(item, state=MediaState.NOT_FETCHED))
        except httpx2.HTTPError as exc:
            raise FetchFailed(f"media fetch failed: {type(exc).__name__}: {exc}") from None

    async def _get(self, item: MediaItem, with_content: bool) -> Attachment:
        hop = Hop(item.url, credentials=True)
        for _ in range(MAX_REDIRECTS + 1):
            auth = self._auth if hop.credentials else None
            async with self._http().stream("GET", hop.url, auth=auth) as response:
                if response.status_code in REDIRECTS:
                    location = response.headers.get("location", "")
                    next_hop = follow(hop.url, location, self._api_base_url, self._redirect_hosts)
                    if next_hop is None:
                        log.warning("media redirect off the allowed hosts refused: %s", location)
                        return Attachment(_with(item, MediaState.UNAVAILABLE))
                    hop = next_hop
                    continue
                return await self._read(item, response, with_content)
        log.warning("media fetch: more than %d redirects", MAX_REDIRECTS)
        return Attachment(_with(item, MediaState.UNAVAILABLE))

    async def _read(
        self, item: MediaItem, response: httpx2.Response, with_content: bool
    ) -> Attachment:
        status = response.status_code
        if is_retryable_status(status):
            raise FetchFailed(
                f"media fetch answered {status}",
                retry_after_seconds(response.headers.get("retry-after")),
            )
        if status >= 300:
            return Attachment(_with(item, MediaState.UNAVAILABLE))
        declared = _content_length(response)
        if declared is not None and declared > self._max_bytes:
            return Attachment(_with(item, MediaState.TOO_LARGE, declared))
        if not with_content and declared is not None:
            return Attachment(_with(item, MediaState.FETCHED, declared))  # its size is enough
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes(CHUNK_BYTES):
            size += len(chunk)
            if size > self._max_bytes:  # stop reading: the rest is never downloaded
                return Attachment(_with(item, MediaState.TOO_LARGE))
            if with_content:
                chunks.append(chunk)
        content = b"".join(chunks) if with_content else None
        return Attachment(_with(item, MediaState.FETCHED, size), content)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def _with(item: MediaItem, state: MediaState, size: int | None = None) -> MediaItem:
    return dataclasses.replace(item, state=state, size=size)


def _content_length(response: httpx2.Response) -> int | None:
    try:
        value = int(response.headers.get("content-length", ""))
    except ValueError:
        return None
    return value if value >= 0 and not response.headers.get("content-encoding") else None
