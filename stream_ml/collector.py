"""Python's cyclic garbage collector, paused where a hot loop allocates many long-lived objects.

A batch of records makes a dozen objects per record (records, events, updates, join entries)
that live until the batch ends, and a replay keeps its events until their vectors are computed.
Collections meanwhile scan them again and again and promote them to the older generations,
whose growth brings on full collections of the whole heap (measured: a sixth of the feedback
worker's label phase, a third of the feature worker's routing, a third of a replay). Paused,
they are freed by their reference counts, unscanned; the rare cyclic garbage made meanwhile
waits for the next collection after the pause.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic cyclic collection inside the block; on again after it only if it was on before."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
