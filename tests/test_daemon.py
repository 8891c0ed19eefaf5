"""Scheduled runs for real: the Dagster daemon, the project's code location and the automation sensor
turned on materialize every stage of a tiny warehouse without `tide run`.

What test_pipelines.py checks tick by tick in-process, here the daemon does on its own: the sensor ticks
(every 5 s here, through TIDE_AUTOMATION_INTERVAL_S; Dagster's default is 30 s), the run queue launches
each requested run in its own process through the code server, and the warehouse's instance records them.
Takes a few minutes: a wave per tick, and each run is a process that imports torch."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from pipelines.definitions import definitions_for
from pipelines.defs.automation import INTERVAL_ENV, SENSOR
from pipelines.instance import ensure_home
from tests.test_pipelines import EDIT

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEADLINE_S = 900  # measured 476 s (9 runs) on 2 cores shared with two other test runs: waves a tick apart


def _default_signals() -> None:
    # A child of a background job inherits SIGINT ignored, and dagster processes then ignore TERM too
    # (STACK-NOTES): restore both so TERM stops the daemon and what it started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop(proc: subprocess.Popen) -> None:
    """TERM the daemon's process group (its code server and runs included), then KILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader when a run was mid-flight
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _missing(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[str]:
    """Asset partitions the instance has no materialization of yet."""
    graph = defs.resolve_asset_graph()
    out = []
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        if node.partitions_def is None:
            if instance.get_latest_materialization_event(key) is None:
                out.append(key.to_user_string())
        else:
            done = instance.get_materialized_partitions(key)
            out += [f"{key.to_user_string()}[{p}]" for p in node.partitions_def.get_partition_keys() if p not in done]
    return sorted(out)


@pytest.mark.slow
def test_the_daemon_materializes_every_stage_with_the_automation_sensor_on(tiny_project, tmp_path):
    started = time.monotonic()
    project = tiny_project(EDIT)
    defs = definitions_for(project)
    home = ensure_home(project)  # the warehouse's own instance, as `tide ui` would use
    env = {**os.environ, "DAGSTER_HOME": home, "TIDE_CONFIG": str(project.config_path), INTERVAL_ENV: "5"}
    code = ["-m", "pipelines.definitions"]

    # The sensor is off by default (it must not race a `tide run`); turn it on in this instance.
    on = subprocess.run([str(BIN / "dagster"), "sensor", "start", SENSOR, *code], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
    assert on.returncode == 0, on.stdout[-2000:] + on.stderr[-2000:]

    log = tmp_path / "daemon.log"
    with open(log, "w") as out:
        daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", *code], env=env, cwd=REPO, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_signals)
    try:
        instance = dg.DagsterInstance.from_config(home)
        missing = _missing(defs, instance)
        failed: list[str] = []
        while missing and not failed and time.monotonic() - started < DEADLINE_S:
            assert daemon.poll() is None, f"the daemon exited {daemon.returncode}: {log.read_text()[-3000:]}"
            time.sleep(5)
            missing = _missing(defs, instance)
            failed = [r.run_id for r in instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))]
        assert not failed, f"runs failed: {failed}; daemon log: {log.read_text()[-3000:]}"
        assert not missing, f"not materialized after {DEADLINE_S} s: {missing}; daemon log: {log.read_text()[-3000:]}"
    finally:
        _stop(daemon)

    runs = instance.get_runs()
    assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [(r.run_id, r.status) for r in runs]
    # every run was requested by the automation sensor, none by `tide run`
    assert all(r.tags.get("dagster/sensor_name") == SENSOR for r in runs), [r.tags for r in runs]
    assert not any("tide/runner" in r.tags for r in runs)
    selected = set().union(*(r.asset_selection or set() for r in runs))
    assert selected == defs.resolve_asset_graph().materializable_asset_keys
    print(f"\n[daemon] {len(runs)} runs materialized every stage in {time.monotonic() - started:.0f} s")
