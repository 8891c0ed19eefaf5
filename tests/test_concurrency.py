"""Readers while a run writes: whole partitions only, and the writer gets its turn within its lock budget.

The load is bench/concurrency.py's, run for a few seconds (the bench prints the figures; nothing here
asserts on time beyond the lock budget itself, which is what a run fails on)."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import pytest

from bench.concurrency import CHECK_SQL, print_report, run_load, torn_rows, write_generation
from storage import Warehouse, WarehouseLockedError, connect


def test_a_torn_partition_is_detected(tmp_path):
    """The check can fail: half a partition, two generations mixed, or a partition missing."""
    path = tmp_path / "warehouse.duckdb"
    wh = Warehouse(path)
    with wh.transaction() as tx:
        write_generation(tx, "sae_0", 1)
        write_generation(tx, "sae_1", 1)
    assert torn_rows(wh.query(CHECK_SQL).to_pylist(), 2) == []
    assert torn_rows(wh.query(CHECK_SQL).to_pylist(), 3) == ["saw 2 of 3 partitions"]
    con = duckdb.connect(str(path))  # what a writer without a transaction could leave visible
    con.execute("DELETE FROM feature_stats WHERE sae_id = 'sae_0' AND step = 0")
    con.execute("UPDATE feature_stats SET mean_act = 2 WHERE sae_id = 'sae_1' AND feature_id = 0")
    con.close()
    assert [line.split(":")[0] for line in torn_rows(wh.query(CHECK_SQL).to_pylist(), 2)] == ["sae_0", "sae_1"]


@pytest.mark.slow
def test_readers_see_whole_partitions_and_the_writer_keeps_its_budget(tmp_path, capsys):
    report = run_load(tmp_path / "wh", seconds=6, readers=2, cli_readers=1, partitions=3)
    with capsys.disabled():
        print()
        print_report(report)  # the figures, for the record (bench/concurrency.py for a longer run)
    for role in report.roles:
        assert role.errors == [], role  # a lock timeout (WarehouseLockedError) would be here
    assert report.whole_partitions_only, [r.torn for r in report.roles]
    writer = report.writer
    assert writer.ops >= 5 and writer.max_wait_s < writer.lock_budget_s
    assert all(r.ops > 0 for r in report.readers)  # every reader got answers while the writer wrote
    assert {r.role for r in report.readers} == {"python", "cli"}


def test_a_waiting_writer_holds_new_readers_back(tmp_path):
    """Writer preference: while a writer waits for a reader to finish, a second reader is held at the
    turnstile, so a stream of overlapping readers cannot keep the writer out."""
    path = tmp_path / "warehouse.duckdb"
    Warehouse(path).init_schema()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, duckdb; con = duckdb.connect(sys.argv[1], read_only=True); print('open', flush=True); "
        "sys.stdin.readline(); con.close()"), str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"  # a reader in the file
        opened = threading.Event()

        def write():
            connect(path, read_only=False, timeout_s=30).close()
            opened.set()

        writer = threading.Thread(target=write)
        writer.start()
        _wait_for_turnstile(path)
        with pytest.raises(WarehouseLockedError, match="a writer is waiting"):
            connect(path, read_only=True, timeout_s=0.5)  # a new reader is held back ...
        holder.stdin.write("\n")
        holder.stdin.flush()  # ... the first reader leaves, and the writer gets the file
        writer.join(timeout=30)
        assert opened.is_set()
        connect(path, read_only=True, timeout_s=5).close()  # and readers are let through again
    finally:
        holder.kill()
        holder.wait()


def _wait_for_turnstile(path: Path) -> None:
    """Until some process holds the writer's turnstile."""
    import fcntl
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (turn := Path(f"{path}.turnstile")).exists():
            fd = os.open(turn, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                return
            finally:
                os.close(fd)
        time.sleep(0.02)
    raise AssertionError("the writer never took the turnstile")
