"""A background writer: one thread draining a bounded queue of write calls.

Capture overlaps the store's compression and I/O with the next sampling step; the bound keeps memory
flat (a full queue makes the producer wait) and the first error surfaces in the producer's thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class WriterStats:
    """Totals of what went through the writer."""

    calls: int = 0
    bytes: int = 0
    busy_seconds: float = 0.0


class BackgroundWriter:
    """``submit(fn, *args)`` runs fn(*args) on the writer thread; ``close()`` waits and re-raises."""

    def __init__(self, max_pending: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.stats = WriterStats()
        self._thread = threading.Thread(target=self._run, name="tide-store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            if self._error is not None:
                continue  # drain without writing after a failure
            t0 = time.perf_counter()
            try:
                written = fn(*args)
                self.stats.bytes += int(written or 0)
            except BaseException as err:  # noqa: BLE001 - re-raised in the producer
                self._error = err
            self.stats.calls += 1
            self.stats.busy_seconds += time.perf_counter() - t0

    def submit(self, fn: Callable, *args) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((fn, args))

    def close(self) -> WriterStats:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.stats

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:  # the producer failed: stop the thread, keep the producer's error
            self._queue.put(None)
            self._thread.join()
