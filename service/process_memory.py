"""How a Parley process hands memory back after a big request (a 28 MB mail, a 5 MB picture)."""

from __future__ import annotations

import contextlib
import ctypes

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, kept from rising


def return_big_frees_to_the_os() -> None:
    """glibc serves a freed large block's size from its heap from then on (its mmap threshold
    rises with each one), and a heap rarely shrinks: after ten 28 MB mails at once the serve
    process kept 230 MiB. A fixed threshold keeps such blocks mapped apart, handed back when
    freed (measured: back to 100-125 MiB within 2 s, `bench/mail_memory.py`). Not glibc
    (macOS has no `mallopt`; musl ignores it): nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
