"""Pausing Python's cyclic garbage collector around bulk loads."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic collection inside: bulk loads (a tree's recipes, a 30,000-entry index)
    allocate hundreds of thousands of objects that all stay alive, and the collector would
    rescan them again and again for nothing (a third of decoding a large index)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
