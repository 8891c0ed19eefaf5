"""Opening the warehouse file: DuckDB connections with lock retry, and values DuckDB can bind.

DuckDB lets only one process open a file while it is open read-write; every other process, even a
read-only one, fails with "Could not set lock on file" (a ``duckdb.IOException``). So the warehouse
holds no connection longer than one call or one ``with`` block, and ``connect`` retries on the lock
error with backoff up to ``timeout_s`` before raising ``WarehouseLockedError`` naming the file.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import duckdb
import numpy as np

from storage.errors import WarehouseError, WarehouseLockedError, WarehouseMissingError

DEFAULT_LOCK_TIMEOUT_S = 60.0
_MAX_BACKOFF_S = 1.0
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

    Retries with exponential backoff (50 ms doubling to 1 s, jittered so competing writers do not
    retry in lockstep) until ``timeout_s`` has passed, then raises ``WarehouseLockedError``. A
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
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as exc:
            if "not a valid DuckDB database" in str(exc):
                raise WarehouseError(
                    f"{path} is not a DuckDB database (a file torn by a crash or a full disk, or another kind of "
                    f"file under that name): move it away (mv {path} {path}.broken) and rebuild the tables "
                    f"with `{REBUILD}`") from exc
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
        delay = min(delay * 2, _MAX_BACKOFF_S)


def bindable(value: object) -> object:
    """``value`` as a query parameter: DuckDB cannot bind numpy scalars (np.int64(3)), their Python
    equivalents bind."""
    return value.item() if isinstance(value, np.generic) else value


def count_of(result: duckdb.DuckDBPyConnection) -> int:
    """The single integer a ``SELECT count(*)`` (or a DELETE / INSERT) returns; 0 for no row."""
    row = result.fetchone()
    return int(row[0]) if row else 0
