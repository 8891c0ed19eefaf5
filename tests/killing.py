"""Fault injection for the kill matrix: run `tide run` in its own process group, SIGKILL it at a point inside
one stage, and see a warehouse the way its readers do.

A kill point is chosen on the timeline of an uninterrupted reference run: a time drawn uniformly inside the
stage (from the runner's "<asset>: missing, materializing" line to its next line) becomes "the n-th output
line after the stage starts, plus a delay". The killed run counts lines the same way, so the kill lands in
the same phase of the stage (training, writing, Dagster recording the materialization, ...) on a fast or a
slow machine. Nothing in the product knows about it: the test reads the run's log and sends the signal.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np

# what differs between two uninterrupted runs and says nothing about the data: wall times, creation
# stamps, the checkout's git describe (others commit while the tests run), and the SAE training key (a
# hash of the store's creation time)
VOLATILE_KEYS = {"created_at", "built_at", "code_version", "seconds", "train_seconds", "sampling_seconds",
                 "training_key"}


@dataclass(frozen=True)
class Line:
    t: float  # seconds since the process started
    text: str


@dataclass(frozen=True)
class KillPoint:
    """SIGKILL `delay` seconds after the `after`-th output line that follows `stage`'s start line."""

    stage: str  # an asset partition as the runner prints it: "sae[01|resid]", "edits"
    after: int
    delay: float

    def __str__(self) -> str:
        return f"{self.stage} +{self.after} lines +{self.delay:.2f}s"


@dataclass
class TideRun:
    returncode: int
    lines: list[Line] = field(default_factory=list)
    killed: bool = False

    @property
    def log(self) -> str:
        return "\n".join(line.text for line in self.lines)

    def stage_span(self, stage: str) -> tuple[int, int]:
        """Indexes of the stage's start line and of the runner's next line (the stage's end)."""
        start = next(i for i, line in enumerate(self.lines) if is_start(line.text, stage))
        end = next((i for i in range(start + 1, len(self.lines)) if self.lines[i].text.startswith("[tide]")),
                   len(self.lines) - 1)
        return start, end

    def said(self, stage: str) -> str:
        """What the runner said about the stage: 'missing, materializing', 'up to date, reused', ..."""
        found = [line.text.split(f" {stage}: ", 1)[1] for line in self.lines
                 if line.text.startswith("[tide]") and f" {stage}: " in line.text]
        return found[0] if found else ""


def is_start(text: str, stage: str) -> bool:
    return text.startswith("[tide]") and f" {stage}: " in text and text.endswith("materializing")


def run_tide(config: Path, kill: KillPoint | None = None, timeout: float = 300) -> TideRun:
    """`tide run --config` to its end, or until the kill point. Output (stderr merged, so the order of the
    runner's lines and Dagster's is the order they were written) is kept line by line with its time."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "--config", str(config)],
                            cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    run, t0, seen = TideRun(returncode=-1), time.monotonic(), None
    watchdog = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))  # a hung run fails the test
    watchdog.start()
    try:
        for text in proc.stdout:
            run.lines.append(Line(time.monotonic() - t0, text.rstrip("\n")))
            if kill is None or run.killed:
                continue
            if seen is None and is_start(run.lines[-1].text, kill.stage):
                seen = len(run.lines) - 1
            if seen is not None and len(run.lines) - 1 - seen >= kill.after:
                time.sleep(kill.delay)
                os.killpg(proc.pid, signal.SIGKILL)
                run.killed = True
    finally:
        watchdog.cancel()
        if proc.poll() is None and not run.killed:
            os.killpg(proc.pid, signal.SIGKILL)
        run.returncode = proc.wait()
    if time.monotonic() - t0 >= timeout:
        raise TimeoutError(f"tide run took over {timeout}s (hung?):\n{run.log[-3000:]}")
    return run


def kill_point(reference: TideRun, stage: str, rng: random.Random) -> KillPoint:
    """A time drawn uniformly inside the stage on the reference's timeline, as (line, delay)."""
    start, end = reference.stage_span(stage)
    t = rng.uniform(reference.lines[start].t, reference.lines[end].t)
    n = max(i for i in range(start, end + 1) if reference.lines[i].t <= t)
    return KillPoint(stage, n - start, t - reference.lines[n].t)


# --- what a reader sees -------------------------------------------------------------------------------------


def snapshot(project_dir: Path) -> dict[str, object]:
    """Everything a reader of the project can see, as comparable values keyed by where it is: files (the
    DiT checkpoint, judge, SAEs, feature summaries, edits, dashboard), the store's done shards, and each
    table's rows by partition. Hidden names (``.x.tmp-*``, ``.dagster``) and ``_state`` are the writers'
    own and no reader looks at them."""
    root = str(project_dir)
    out: dict[str, object] = {}
    for path in sorted(project_dir.rglob("*")):
        rel = path.relative_to(project_dir)
        if (not path.is_file() or any(p.startswith((".", "_")) for p in rel.parts)
                or "activations.zarr" in rel.parts or path.name.startswith("warehouse.duckdb")
                or rel.suffix == ".log"):
            continue
        out[f"file:{rel}"] = _file_value(path, root)
    warehouse = project_dir / "warehouse"
    out.update(_store(warehouse / "activations.zarr"))
    out.update(_tables(warehouse / "warehouse.duckdb", root))
    return out


def _file_value(path: Path, root: str) -> object:
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        from safetensors.numpy import load

        return {k: _array(v) for k, v in load(data).items()}
    if path.suffix == ".npz":
        with np.load(io.BytesIO(data)) as z:
            return {k: _array(z[k]) for k in z.files}
    if path.suffix == ".json":
        return _clean(json.loads(data), root)
    return data.replace(root.encode(), b"<root>")


def _array(a: np.ndarray) -> tuple:
    return str(a.dtype), a.shape, a.tobytes()


def _clean(value: object, root: str) -> object:
    """JSON-like value with volatile keys dropped, the project's path replaced, floats exact (NaN == NaN)."""
    if isinstance(value, dict):
        return {k: _clean(v, root) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list | tuple):
        return [_clean(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<root>")
    if isinstance(value, float):
        return "nan" if math.isnan(value) else value.hex()
    return value


def _store(url: Path) -> dict[str, object]:
    """Per done shard: its samples, images and every activation array's slice (what readers may read)."""
    from storage import ActivationStore

    if not (url / "zarr.json").exists():
        return {}
    store = ActivationStore.open(str(url), mode="r")
    layout, out = store.layout, {}
    for shard in store.done_shards():
        r = layout.shard_range(shard)
        value = {"images": _array(store.images(r.start, r.stop))}
        value.update({k: _array(v[r.start:r.stop]) for k, v in store.samples().items()})
        for site in layout.sites:
            for layer in layout.layers:
                value[f"{site}/{layer}"] = _array(store.read_samples(site, layer, r.start, r.stop))
        out[f"store:shard{shard}"] = value
    return out


def _tables(path: Path, root: str) -> dict[str, object]:
    """Each table's rows grouped by the first column of its grain (the unit a stage replaces)."""
    from storage.schema import TABLES

    if not path.exists():
        return {}
    out: dict[str, object] = {}
    with duckdb.connect(str(path), read_only=True) as con:
        present = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        for name, table in TABLES.items():
            if name not in present:
                continue
            cols = [c for c in table.column_names if c not in VOLATILE_KEYS]
            rows = con.execute(f"SELECT {', '.join(cols)} FROM {name}").fetchall()
            key = cols.index(table.grain[0])
            for row in rows:
                out.setdefault(f"table:{name}:{row[key]}", []).append(tuple(_clean(_json(v), root) for v in row))
    return {k: sorted(v, key=repr) for k, v in out.items()}


def _json(value: object) -> object:
    """JSON columns come back as text: parse them so volatile keys inside (code_version) can be dropped."""
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def differences(seen: dict[str, object], reference: dict[str, object], *, exact: bool) -> list[str]:
    """Where `seen` disagrees with the reference: a visible item that differs or should not exist, and
    (exact) one that is missing."""
    out = [f"{k}: not in the reference run" for k in seen.keys() - reference.keys()]
    out += [f"{k}: differs from the reference run" for k in seen.keys() & reference.keys() if seen[k] != reference[k]]
    if exact:
        out += [f"{k}: missing" for k in reference.keys() - seen.keys()]
    return sorted(out)
