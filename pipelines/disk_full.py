"""A run that stopped on a full disk, said plainly: the disk is full, which file it was writing, and that
running again after freeing space resumes.

A full disk fails a run wherever it happens to be writing, and each writer says it its own way: a chunk of
the activation store (``[Errno 28] No space left on device: '<file>'``), DuckDB (``Could not write file
"<file>": No space left on device``), an SAE checkpoint (the same OSError), or Dagster's own records in
``<root>/.dagster`` on the same disk, whose SQLite says ``database or disk is full`` or only ``disk I/O
error`` and escapes ``tide run`` as a traceback. So a failure counts as a full disk when its text says so
or when the warehouse's disk has (almost) no room left, and ``tide run`` adds one message to the error.

Resuming is safe because every write is atomic or redone: a shard without its done marker is sampled
again, a DuckDB transaction that could not commit leaves the old rows, a checkpoint is renamed into place.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from pipelines.project import Project
from pipelines.store_size import human_bytes

SAYS_FULL = ("no space left on device", "errno 28", "database or disk is full", "disk quota exceeded")
ALMOST_FULL = 1 << 20  # bytes: less than this free and any write may be the one that fails
_NAMED = (re.compile(r"No space left on device: '([^']+)'"),
          re.compile(r'Could not write (?:all bytes to )?file "([^"]+)"'))


def message(project: Project, error_text: str) -> str | None:
    """What to tell the user when a run failed with ``error_text``; None when the disk is not the reason."""
    free = free_bytes(project.root)
    says = any(s in error_text.lower() for s in SAYS_FULL)
    if not says and (free is None or free >= ALMOST_FULL):
        return None
    named = next((m[1] for pattern in _NAMED if (m := pattern.search(error_text))), None)
    what = f"writing {named} failed" if named else f"a write under {project.root} failed"
    room = f"{human_bytes(free)} free" if free is not None else "free space unknown"
    return (f"the disk is full: {what} ({room} on the disk holding {project.root}). Nothing written before is "
            "lost: finished shards, SAE checkpoints and committed tables are kept, and the shard, checkpoint or "
            "table being written is redone. Free space on that disk (or capture less: `tide config --check` "
            "estimates the activation store), then run the same `tide run` again: it resumes where it stopped.")


def free_bytes(path: Path) -> int | None:
    """Free bytes on the disk holding ``path`` (its nearest existing folder)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def failed_runs_text(project: Project, since: float) -> str:
    """The errors of the runs of this warehouse that failed after ``since`` (a time.time()); empty when
    there are none or the instance cannot be read (on a full disk it may not be)."""
    import dagster as dg

    from pipelines.instance import warehouse_instance

    try:
        instance = warehouse_instance(project)
        runs = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE],
                                               created_after=_utc(since)), limit=5)
        errors = [e.dagster_event.step_failure_data.error for r in runs
                  for e in instance.all_logs(r.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)]
    except Exception:  # noqa: BLE001 - an unreadable instance only means there is less to go on
        return ""
    return "\n".join(err.to_string() for err in errors if err is not None)


def _utc(t: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t - 1, tz=UTC)
