"""What the model is shown of a message's attachments (SPEC §10): pure rules, no I/O.

An image the model can look at goes as a base64 `data:` URL in the turn it arrives in; every
other attachment, and every attachment of an earlier turn, is a short text note such as
`[attachment: audio/amr, 12 KB]`, so the model knows something was sent without the bytes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from service.types import MediaItem, MediaState, Sender, Turn

# The types OpenAI's chat completions accept as `image_url` parts.
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

# Token estimate of one image part. OpenAI counts an image at high detail as 85 tokens plus
# 170 per 512-pixel tile after scaling it to fit 2048 px and then 768 px on its short side:
# a 4:3 phone photo becomes 1024x768, 4 tiles, 765 tokens. Parley does not decode images, so
# every image counts as that photo (a tall screenshot costs up to 1,445, a tiny one 85).
IMAGE_TOKENS = 85 + 4 * 170

# Image bytes one prompt may carry. Base64 and the SDK's JSON encoding of the request run on
# the event loop (about 60 ms per 10 MB here): ten 5 MB photos in one burst would stall it
# for most of a second and hold ~2.4x their size in memory. Past the budget, an image is a note.
PROMPT_IMAGE_BYTES = 10 * 1024 * 1024


def base_type(content_type: str) -> str:
    """`image/JPEG; charset=x` as `image/jpeg`."""
    return content_type.split(";", 1)[0].strip().lower()


def is_image(content_type: str) -> bool:
    return base_type(content_type) in IMAGE_TYPES


def sniff_image(data: bytes) -> str | None:
    """The image type the bytes really are (by their magic number), None if not one of
    `IMAGE_TYPES`: a mislabelled file must not make the model call fail."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def data_url(data: bytes) -> str | None:
    """The image as a `data:` URL for an `image_url` part; None if it is not a readable image."""
    kind = sniff_image(data)
    if kind is None:
        return None
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def format_size(size: int) -> str:
    """`512 bytes`, `12 KB`, `3.4 MB` (binary units, as a phone shows them)."""
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{max(1, round(size / 1024))} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def describe(item: MediaItem) -> str:
    """An attachment in a few words: `audio/amr, 12 KB`, `image/jpeg, unavailable` (the
    model's note, the transcript and the operator all read this)."""
    kind = base_type(item.content_type) or "application/octet-stream"
    if item.state is MediaState.UNAVAILABLE:
        return f"{kind}, unavailable"
    if item.state is MediaState.NOT_FETCHED:
        host = urlsplit(item.url).hostname or "an unknown host"
        return f"{kind} at {host}, not fetched"
    if item.state is MediaState.TOO_LARGE:
        size = f", {format_size(item.size)}" if item.size is not None else ""
        return f"{kind}{size}, too large to open"
    if item.size is None:
        return kind
    return f"{kind}, {format_size(item.size)}"


def note(item: MediaItem) -> str:
    """The text the model reads in place of an attachment: `[attachment: audio/amr, 12 KB]`."""
    return f"[attachment: {describe(item)}]"


def with_notes(body: str, notes: Iterable[str]) -> str:
    """The message text followed by its attachment notes, one a line."""
    return "\n".join(part for part in (body.strip(), *notes) if part)


def history_text(body: str, media: Sequence[MediaItem]) -> str:
    """An earlier message as history shows it: its text and a note per attachment (images
    go to the model only in the turn they arrive in)."""
    return with_notes(body, (note(item) for item in media)) if media else body


def arriving_turn(
    body: str,
    attachments: Sequence[tuple[MediaItem, bytes | None]],
    image_budget: int = PROMPT_IMAGE_BYTES,
) -> tuple[Turn, int]:
    """The message a person just sent as the model's new turn: its text with a note per
    attachment the model cannot look at, and its readable images (fetched, with their bytes)
    as `data:` URLs in the order they were sent, while they fit `image_budget` bytes. Returns
    the turn and the budget left for the prompt's next turns."""
    images: list[str] = []
    notes: list[str] = []
    for item, content in attachments:
        fits = content is not None and len(content) <= image_budget
        readable = fits and item.state is MediaState.FETCHED
        url = data_url(content) if readable and content is not None else None
        if url is None:
            notes.append(note(item))
        else:
            images.append(url)
            image_budget -= len(content or b"")
    return Turn(Sender.USER, with_notes(body, notes), tuple(images)), image_budget
