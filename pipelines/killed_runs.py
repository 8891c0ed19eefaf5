"""Runs left behind by a killed `tide run`: found by the process that started them, and closed.

A SIGKILL skips Dagster's own cleanup, so the run of the asset partition in progress stays STARTED in the
warehouse's instance, and the slot it held in a concurrency pool is never given back. The `tide_duckdb`
pool admits one run, so the next `tide run` would wait for that slot forever. Each run `tide run` starts
carries its process (``tide/pid``: host and PID); a later `tide run` marks the runs whose process is gone as
failed and frees their slots. Runs of a live process (another `tide run` on the same warehouse) and runs
started without the tag (the UI, the automation sensor) are left alone.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import dagster as dg

PID_TAG = "tide/pid"
IN_PROGRESS = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
               dg.DagsterRunStatus.CANCELING]


def owner_tag() -> dict[str, str]:
    """The tag that names this process as the owner of the runs it starts."""
    return {PID_TAG: f"{socket.gethostname()}:{os.getpid()}"}


def release_killed_runs(instance: dg.DagsterInstance, log: Callable[[str], None]) -> list[str]:
    """Mark the in-progress runs whose `tide run` process is gone as failed and free their pool slots;
    returns their run ids."""
    host = socket.gethostname()
    released = []
    for run in instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS)):
        owner_host, _, pid = run.tags.get(PID_TAG, "").rpartition(":")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        instance.report_run_failed(run, message=f"the tide run that started it (PID {pid}) was killed")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        partition = run.tags.get("dagster/partition")
        what = ", ".join(sorted(k.to_user_string() for k in run.asset_selection or ())) + (
            f"[{partition}]" if partition else "")
        log(f"[tide] run {run.run_id} ({what}) was left in progress by a killed tide run (PID {pid}): "
            "marked failed, its pool slots freed")
        released.append(run.run_id)
    return released


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
