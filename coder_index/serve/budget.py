"""A budget of decoded pixels across requests: what bounds the server's memory under the limits.

Each upload or listed image is checked against ``--max-megapixels`` from its header, but many
images within that limit, decoded at once by concurrent requests, would still add up (16 black
36-megapixel PNGs are 547 KiB on the wire and several GB decoded). A decode holds its image's
pixels from the budget until its pixels are preprocessed; others wait their turn.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from coder_index.core.pages import trim_heap

LARGE = 4_000_000  # pixels: after an image this large, freed memory is handed back to the system


class PixelBudget:
    def __init__(self, limit: int) -> None:
        self.limit = max(1, int(limit))
        self.held = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Wait until ``pixels`` (at most the whole budget: one image always fits) are free, hold them."""
        want = min(max(1, int(pixels)), self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.held + want <= self.limit)
            self.held += want
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            if want >= LARGE:
                trim_heap()  # before the next image is let in: freed arenas do not add up across threads
            with self._cond:
                self.held -= want
                self._cond.notify_all()
