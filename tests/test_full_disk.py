"""A warehouse on a disk that fills up mid-run: `tide run` stops with a message that says the disk is full,
names what it was writing and says to run again; nothing written before is damaged; and once space is
freed the same command resumes (finished shards are not sampled again) and completes.

The disk is a size-limited tmpfs mounted by the test (needs root on Linux; skipped with the reason
otherwise). The preflight checks room for the activation store only, so the disk starts with plenty and a
filler file takes the rest once the SAE stage starts writing checkpoints: after capture and the samples
table, which must survive intact."""

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from pipelines import disk_full
from tests.test_pipelines import EDIT

DISK_MB = 64


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("the full-disk test mounts a size-limited tmpfs, which needs root on Linux")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({made.stderr.strip() or made.returncode}): the "
                    "full-disk test needs `mount -t tmpfs` (root in a VM or container that allows mounts)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill_when(trigger: Path, filler: Path, stop: threading.Event) -> None:
    """Once ``trigger`` exists, write ``filler`` until the disk has no byte left."""
    while not trigger.exists():
        if stop.wait(0.02):
            return
    try:
        with open(filler, "wb") as f:
            for size in (1 << 20, 1 << 12):
                try:
                    while True:
                        f.write(b"\0" * size)
                        f.flush()
                except OSError as err:
                    assert err.errno == errno.ENOSPC, err
    except OSError as err:  # closing flushes what the last write left in the buffer
        assert err.errno == errno.ENOSPC, err


def tide_run(project) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(project.config_path)],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_clearly_and_the_run_resumes_once_space_is_freed(small_disk, tiny_project):
    from storage import ActivationStore, Warehouse

    project = tiny_project(EDIT, name="disk/run")  # config, warehouse and instance on the small disk
    assert small_disk in project.root.parents
    filler, stop = small_disk / "filler", threading.Event()
    fill = threading.Thread(target=_fill_when, args=(project.saes_dir, filler, stop), daemon=True)
    fill.start()
    try:
        first = tide_run(project)
    finally:
        stop.set()
        fill.join(timeout=60)
    assert filler.exists(), f"the SAE stage never started: {first.stdout[-2000:]}{first.stderr[-2000:]}"
    out = first.stdout + first.stderr
    assert first.returncode == 1, out[-3000:]
    assert "the disk is full" in out and str(project.root) in out, out[-3000:]
    assert "run the same `tide run` again: it resumes where it stopped" in out

    # Nothing written before the disk filled is damaged: every shard reads back, the samples table is whole.
    store = ActivationStore.open(project.store_url, mode="r")
    assert store.done_shards() == list(range(project.num_shards))
    for shard in range(project.num_shards):
        for layer in project.config.capture.layers:
            for step in store.layout.steps:
                assert np.isfinite(store.read_block("resid", layer, step, shard).astype(np.float32)).all()
    wh = Warehouse(project.duckdb_path)
    assert wh.query("SELECT count(*) AS n FROM samples").column(0)[0].as_py() == project.config.sampling.num_samples
    assert wh.check_grain("samples") == 0

    filler.unlink()  # space freed
    second = tide_run(project)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    for shard in range(project.num_shards):  # resumed: the captured shards are reused, not sampled again
        assert f"activations[{shard:05d}]: up to date, reused" in second.stdout
    assert wh.query("SELECT count(*) FROM saes").column(0)[0].as_py() > 0
    for table in ("samples", "saes", "feature_stats", "top_images"):
        assert wh.check_grain(table) == 0, table


def test_a_failure_is_called_a_full_disk_only_when_it_is_one(tiny_project, monkeypatch):
    project = tiny_project()
    zarr_text = "OSError: [Errno 28] No space left on device: '/data/wh/activations.zarr/acts/resid/layer_01/c.3.1.0.0'"
    said = disk_full.message(project, zarr_text)
    assert said.startswith("the disk is full: writing /data/wh/activations.zarr/acts/resid/layer_01/c.3.1.0.0 failed")
    duck = 'IOException: IO Error: Could not write file "/data/wh/warehouse.duckdb": No space left on device'
    assert "writing /data/wh/warehouse.duckdb failed" in disk_full.message(project, duck)
    assert disk_full.message(project, "ValueError: capture.layers contains [9]") is None  # room to spare here
    # Dagster's SQLite on a full disk may only say "disk I/O error": the free space decides.
    monkeypatch.setattr(disk_full, "free_bytes", lambda path: 4096)
    said = disk_full.message(project, "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) disk I/O error")
    assert said.startswith(f"the disk is full: a write under {project.root} failed (4.1 KB free")
