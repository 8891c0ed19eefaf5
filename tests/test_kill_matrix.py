"""Kill anywhere: `tide run` SIGKILLed at a random point inside a stage, then run again, ends with the store,
tables, SAEs and files of an uninterrupted run, and what readers see right after the kill is always a part
of that final state (never half of a file, a shard or a table partition).

The reduced matrix (in `make test`) kills one run inside each of six stages in turn, resuming in between;
the full one (`make kill-matrix`, marker `killmatrix`) kills a fresh warehouse once per asset partition and
seed (`TIDE_KILL_SEEDS=0,1,2` for more). Kill points come from the reference run's timeline
(tests/killing.py). Every stage is deterministic here, so the comparison is bit for bit everywhere (only
wall times, creation stamps and hashes of them are left out: ``killing.VOLATILE_KEYS``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.killing import KillPoint, TideRun, differences, kill_point, run_tide, snapshot

# the tiny config, cheaper still: the graph runs end to end in ~20 s, the DiT and judge trained here
CONFIG = {
    "sae": {"train": {"total_tokens": 6000}, "eval_tokens": 2000, "splice_samples": 0},
    "edit": {"feature_ids": [0, 1], "units": "absolute", "spatial": False, "n_samples": 2, "strengths": [1.0],
             "windows": ["all"]},
}
# the reduced set (make test): one partition of model training, capture, publish, SAE training, the feature
# pass (an asset of the one-run DuckDB pool) and the dashboard; one killed run each, ~2 min in all on 2 idle
# cores. The full matrix adds the judge, top images, editing and every other partition.
STAGES = ("dit_model", "activations[00001]", "samples", "sae[01|resid]", "feature_stats[00|resid]",
          "feature_dashboard")
SEEDS = [int(s) for s in os.environ.get("TIDE_KILL_SEEDS", "0,1").split(",")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[TideRun, dict]:
    """One uninterrupted run: its timeline (for the kill points) and what it leaves."""
    d = tmp_path_factory.mktemp("reference")
    run = run_tide(write_config(d, CONFIG))
    assert run.returncode == 0, run.log[-3000:]
    return run, snapshot(d)


def kill_and_check(config: Path, kill: KillPoint, reference: dict) -> TideRun:
    """Kill a run at `kill`; whatever a reader sees then must be part of the reference's final state."""
    run = run_tide(config, kill)
    assert run.killed or run.returncode == 0, run.log[-3000:]
    seen = differences(snapshot(config.parent), reference, exact=False)
    assert not seen, f"after a kill at {kill}, readers see: {seen[:10]}"
    return run


def resume_and_check(config: Path, reference: dict) -> TideRun:
    run = run_tide(config)
    assert run.returncode == 0, run.log[-3000:]
    diff = differences(snapshot(config.parent), reference, exact=True)
    assert not diff, f"the resumed run differs from an uninterrupted one: {diff[:10]}"
    return run


@pytest.mark.slow
def test_killed_at_every_stage_in_turn_ends_as_an_uninterrupted_run(reference, tmp_path):
    """One warehouse, killed once inside each stage; each run resumes what the last one left."""
    timeline, final = reference
    config = write_config(tmp_path, CONFIG)
    rng = random.Random(0)
    for stage in STAGES:
        kill = kill_point(timeline, stage, rng)
        run = kill_and_check(config, kill, final)
        print(f"killed at {kill}: {'yes' if run.killed else 'no, the run ended first'}")
    resumed = resume_and_check(config, final)
    assert "up to date, reused" in resumed.said(STAGES[0])  # nothing is redone twice


def all_partitions() -> list[str]:
    """Every asset partition of the tiny graph, as the runner names them."""
    layers = ["00|resid", "01|resid"]
    return (["dit_model", "judge", "activation_store", "sample_quality"]
            + [f"activations[{s:05d}]" for s in range(3)] + ["samples"]
            + [f"{a}[{x}]" for a in ("sae", "feature_stats") for x in layers] + ["sae_metrics"]
            + [f"top_images[{x}]" for x in layers] + ["edits", "feature_dashboard"])


@pytest.mark.killmatrix
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("stage", all_partitions())
def test_killed_inside_a_stage_resumes_to_the_uninterrupted_result(reference, tmp_path, stage, seed):
    timeline, final = reference
    config = write_config(tmp_path, CONFIG)
    kill = kill_point(timeline, stage, random.Random(f"{stage}:{seed}"))
    killed = kill_and_check(config, kill, final)
    assert killed.killed, f"the run ended before the kill at {kill}"
    resumed = resume_and_check(config, final)
    # the killed partition is redone (and the runner says so) unless Dagster recorded it before the kill
    assert resumed.said(stage) in ("missing, materializing", "up to date, reused"), resumed.log[-3000:]
