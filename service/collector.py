"""Python's cyclic garbage collector, kept off the objects that live as long as the process.

A full (generation 2) collection walks every object the collector tracks. In a serving
process most of them are its own furniture: the modules of Parley, SQLAlchemy, the SDKs and
their tables, the compiled statements. Measured under load (100 webhooks a second, SQLite,
zero-latency fakes) each full collection took ~115 ms, a few a minute, and held the event
loop that long: every webhook and reply in flight waited, and they were the latency's p99.

`gc.freeze()` moves every object alive at that moment to a permanent generation that
collections skip. Frozen objects are still freed the moment their last reference goes (that
is reference counting, not the collector); only a cycle among them would never be collected.
So a process freezes when what is alive is its own: once started (`parley serve` and
`parley worker`, not the tests' many apps in one process), and once more after a lazily
imported SDK (the openai SDK, ~0.5 s of import) has loaded, where the few request objects then
in flight are frozen with it: a one-time, bounded cost.
"""

from __future__ import annotations

import gc

_frozen = False  # whether this process froze what it started with


def freeze_for_good() -> None:
    """Once started: free startup's garbage (a full collection, before any load), then leave
    everything alive out of later collections."""
    global _frozen
    gc.collect()
    gc.freeze()
    _frozen = True


def freeze_again() -> None:
    """After a lazy import, in a process that froze at start: its objects join the others."""
    if _frozen:
        gc.freeze()
