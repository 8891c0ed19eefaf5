"""Opening the warehouse file: DuckDB connections with lock retry, and values DuckDB can bind.

DuckDB lets only one process open a file while it is open read-write; every other process, even a
read-only one, fails with "Could not set lock on file" (a ``duckdb.IOException``). So the warehouse
holds no connection longer than one call or one ``with`` block, and ``connect`` retries on the lock
error with backoff up to ``timeout_s`` before raising ``WarehouseLockedError`` naming the file.

Writers go first. Readers that poll (dashboards building, scripts, several ``tide sql``) overlap their
short connections, and DuckDB's lock does not queue: a writer could retry for as long as any reader is
open, measured at 23 s for one transaction with four polling readers (bench/concurrency.py). So a writer
first takes a turnstile, an exclusive ``flock`` on ``<file>.turnstile``, and holds it until it has the
file; readers pass the turnstile before each attempt and wait while a writer holds it, so the readers
already in finish and no new one starts. The kernel drops the flock when a process dies, so a crash
leaves nothing to clean up. Without ``fcntl`` (Windows) or a turnstile file, readers go straight in.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import duckdb
import numpy as np

from storage.errors import WarehouseError, WarehouseLockedError, WarehouseMissingError

try:
    import fcntl
except ImportError:  # Windows: no flock, so no writer preference
    fcntl = None

DEFAULT_LOCK_TIMEOUT_S = 60.0
_MAX_BACKOFF_S = 1.0
# Readers retry sooner: a writer's transaction lasts tens of milliseconds, and a reader that sleeps a second
# after each one loses every race to the next (measured: 4 s waits at 10 transactions a second).
_MAX_READER_BACKOFF_S = 0.2
# Every asset that writes tables: forcing them rebuilds a warehouse file from the store and the checkpoints.
REBUILD = ("tide run --force prompts --force samples --force sae --force feature_stats --force top_images "
           "--force edits")


def _is_lock_error(exc: duckdb.Error) -> bool:
    # Another process holding the file: IOException "Could not set lock on file ...". This process
    # already holding it in the other mode (read-only vs read-write): ConnectionException
    # "... different configuration than existing connections"; it clears when that connection closes.
    text = str(exc).lower()
    if isinstance(exc, duckdb.IOException):
        return "lock" in text
    return isinstance(exc, duckdb.ConnectionException) and "different configuration" in text


def connect(
    path: str | Path, *, read_only: bool, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
) -> duckdb.DuckDBPyConnection:
    """Open the database file, retrying while another process holds its lock.

    Retries with exponential backoff (50 ms doubling to 1 s, 0.2 s for readers; jittered so competing writers do not
    retry in lockstep) until ``timeout_s`` has passed, then raises ``WarehouseLockedError``; a reader
    also waits while a writer holds the turnstile (see the module's note). A
    read-only open of a missing file raises ``WarehouseMissingError`` at once; a read-write open
    creates the file and its parent folder. The caller closes the connection (``with`` works).
    """
    path = Path(path)
    if read_only and not path.exists():
        raise WarehouseMissingError(
            f"no warehouse at {path}: nothing has been written there yet. Run the pipeline to build it, "
            "or point to an existing warehouse.duckdb."
        )
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    turnstile = _Turnstile(path, writer=not read_only)
    try:
        return _open(path, read_only, timeout_s, turnstile)
    finally:
        turnstile.close()  # a writer lets readers through again once it has the file (or gave up)


def _open(path: Path, read_only: bool, timeout_s: float, turnstile: _Turnstile) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        if not turnstile.admits():
            last = "a writer is waiting for the file, and readers let it in first"
        else:
            try:
                return duckdb.connect(str(path), read_only=read_only)
            except duckdb.Error as exc:
                if "not a valid DuckDB database" in str(exc):
                    raise WarehouseError(
                        f"{path} is not a DuckDB database (a file torn by a crash or a full disk, or another kind "
                        f"of file under that name): move it away (mv {path} {path}.broken) and rebuild the "
                        f"tables with `{REBUILD}`") from exc
                if not _is_lock_error(exc):
                    raise WarehouseError(f"could not open {path}: {exc}") from exc
                last = str(exc)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            mode = "read-only" if read_only else "read-write"
            raise WarehouseLockedError(
                f"could not open {path} {mode} within {timeout_s:g} s: another process holds it "
                "(DuckDB lets one process at a time open a file that is being written, readers included). "
                "Wait for that process, e.g. a running pipeline, to finish, or raise the lock timeout. "
                f"DuckDB said: {last}"
            )
        time.sleep(min(delay * random.uniform(0.5, 1.0), remaining))
        delay = min(delay * 2, _MAX_READER_BACKOFF_S if read_only else _MAX_BACKOFF_S)


class _Turnstile:
    """A writer holds ``<file>.turnstile`` exclusively while it waits for the file; a reader is admitted
    when it can take the turnstile shared for an instant (a writer is then not waiting)."""

    def __init__(self, path: Path, *, writer: bool):
        self.writer, self.held, self.fd = writer, False, None
        if fcntl is None:
            return
        try:
            flags = os.O_RDWR | os.O_CREAT if writer else os.O_RDONLY
            self.fd = os.open(f"{path}.turnstile", flags, 0o644)
        except OSError:
            pass  # no writer has made one yet, or a read-only folder: nothing to queue behind

    def admits(self) -> bool:
        if self.fd is None or self.held:
            return True
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_EX if self.writer else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            return True  # a filesystem without flock: DuckDB's own lock still guards the file
        if self.writer:
            self.held = True  # kept until close(): readers wait from now on
        else:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def bindable(value: object) -> object:
    """``value`` as a query parameter: DuckDB cannot bind numpy scalars (np.int64(3)), their Python
    equivalents bind."""
    return value.item() if isinstance(value, np.generic) else value


def count_of(result: duckdb.DuckDBPyConnection) -> int:
    """The single integer a ``SELECT count(*)`` (or a DELETE / INSERT) returns; 0 for no row."""
    row = result.fetchone()
    return int(row[0]) if row else 0
