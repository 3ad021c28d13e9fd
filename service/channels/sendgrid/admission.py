"""How many big mails a process reads at once: a budget of bytes, taken before a body is read.

A mail in flight holds what is kept of it (`inbound.FormReader`: up to ~13 MiB for a raw
mail, a few for a parsed one) until it is stored. Nothing bounded how many were in flight:
fifty 28 MB mails mailed at once would have held ~600 MiB, and each waited for an extraction
child inside its own extraction budget, past which its text is not stripped. A mail declaring
more than `SMALL_MAIL_BYTES` takes its share of `BUDGET_BYTES` first, in arrival order; while
it waits its body stays unread in the socket (TCP holds the sender back), and it is answered
like any other mail once read. Refusing instead would lose it: SendGrid retries only a 5xx,
which SPEC §9 keeps for an unavailable database. Smaller mails take their size from a budget
of their own (`SMALL_BUDGET_BYTES`), so ordinary mail never waits behind big mail, and
hundreds of slow 1 MB uploads (300 held 300 MB) cannot take the host's memory either.
"""

from __future__ import annotations

from service.byte_budget import ByteBudget
from service.channels.sendgrid.extraction import EXTRACTION_PROCESSES
from service.channels.sendgrid.limits import MAX_MIME_BYTES

# Kept of one mail at most: its raw MIME (`MAX_MIME_BYTES`) or parsed-mode text, HTML and
# headers, plus the short fields.
KEPT_PER_MAIL_BYTES = MAX_MIME_BYTES + 3 * 1024 * 1024
# Mails at most this large (by Content-Length) are read at once, outside the budget.
SMALL_MAIL_BYTES = 1024 * 1024
# As many mails of the largest kind as there are extraction children (~26 MiB held): more in
# flight would only wait for a child inside their extraction budget (a 10 MB raw mail takes
# ~0.4 s of a child's work) and fall back to unstripped text, where here they wait unread.
BUDGET_BYTES = EXTRACTION_PROCESSES * KEPT_PER_MAIL_BYTES
# Mails of at most `SMALL_MAIL_BYTES` read at once, by their declared size: 32 of the largest,
# hundreds of ordinary ones (a few KB to tens of KB each).
SMALL_BUDGET_BYTES = 32 * SMALL_MAIL_BYTES


def small_share(declared_bytes: int | None) -> int:
    """What a small mail holds of `SMALL_BUDGET_BYTES` while it is read: its declared size."""
    if declared_bytes is None or declared_bytes > SMALL_MAIL_BYTES:
        return 0
    return declared_bytes


class MailBudget(ByteBudget):
    """Bytes of big mails in flight (`ByteBudget`), with what one mail holds (`share`)."""

    def __init__(self, capacity: int = BUDGET_BYTES) -> None:
        super().__init__(capacity)

    @staticmethod
    def share(declared_bytes: int | None, limit: int) -> int:
        """What a mail holds while it is read: its size when declared, at most what is kept of
        a mail; a body of unknown size (chunked) is counted as the largest. Nothing for a small
        mail, nor for one over `limit` (refused before a byte of it is read)."""
        if declared_bytes is None:
            return KEPT_PER_MAIL_BYTES
        if declared_bytes <= SMALL_MAIL_BYTES or declared_bytes > limit:
            return 0
        return min(declared_bytes, KEPT_PER_MAIL_BYTES)
