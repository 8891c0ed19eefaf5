"""The Dagster side: definitions, the asset graph as the only order, reuse by code and data versions, the
automation conditions, and one instance per warehouse."""

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from pipelines.definitions import build_definitions, definitions_for
from pipelines.runner import materialize
from tests.conftest import write_config

REPO = Path(__file__).resolve().parent.parent
# an edit that any tiny SAE can make (explicit features, raw units), so the whole graph runs
EDIT = {"edit": {"feature_ids": [0, 1], "units": "absolute", "spatial": False, "n_samples": 2, "strengths": [1.0],
                 "windows": ["all"]}}
ASSETS = {"dit_model", "judge", "sample_quality", "activation_store", "activations", "samples", "sae", "sae_metrics",
          "feature_stats", "top_images", "edits", "feature_dashboard"}


def test_definitions_for_the_default_config():
    defs = build_definitions(str(REPO / "tide.toml"))
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.materializable_asset_keys} == ASSETS
    shards = graph.get(dg.AssetKey("activations")).partitions_def.get_partition_keys()
    assert shards == [f"{i:05d}" for i in range(8)]  # 512 samples / 64 per shard
    for name in ("sae", "feature_stats", "top_images"):
        keys = graph.get(dg.AssetKey(name)).partitions_def.get_partition_keys()
        assert sorted(keys) == ["01|resid", "03|resid", "05|resid"]
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        assert node.code_version and node.automation_condition is not None, key
    # no jobs chained by sensors: the automation sensor, off by default, is the only one
    assert [s.name for s in defs.sensors] == ["tide_automation"]
    assert defs.resolve_sensor_def("tide_automation").default_status == dg.DefaultSensorStatus.STOPPED
    assert not defs.jobs and not defs.schedules


def test_a_family_without_a_judge_has_no_judge_assets(tmp_path):
    from tests.test_dit_sampling import tiny_hub_dit

    model_dir = tiny_hub_dit(tmp_path)
    defs = build_definitions(str(write_config(tmp_path, {"model": {"source": str(model_dir)}})))
    names = {k.to_user_string() for k in defs.resolve_asset_graph().materializable_asset_keys}
    assert names == ASSETS - {"judge", "sample_quality"}


def test_code_versions_follow_only_the_config_fields_an_asset_reads(tmp_path):
    def versions(overrides):
        defs = build_definitions(str(write_config(tmp_path / str(len(overrides)), overrides)))
        graph = defs.resolve_asset_graph()
        return {k.to_user_string(): graph.get(k).code_version for k in graph.materializable_asset_keys}

    base = versions({})
    top = versions({"features": {"top_n": 3}})
    assert {k for k in base if base[k] != top[k]} == {"feature_stats", "top_images"}
    batch = versions({"sampling": {"batch_size": 4}, "features": {"workers": 1}, "model": {"device": "cpu"}})
    assert batch == base  # settings that cannot change a result redo nothing
    # BatchTopK's settings count only away from their defaults: a config without them keeps its versions
    rate = versions({"sae": {"spec": {"threshold_rate": 0.02}}})
    assert {k for k in base if base[k] != rate[k]} == {"sae"} and "-batch-" in rate["sae"]
    assert versions({"sae": {"spec": {"threshold_rate": 0.01}}}) == base
    # how often a DiT training saves its state is not part of any result
    assert versions({"model": {"digits": {"resume_every": 7}}}) == base
    # edit.concept counts only when set, so warehouses with edits from before it keep their versions
    concept = versions({"edit": {"concept": "3"}})
    assert {k for k in base if base[k] != concept[k]} == {"edits"} and "-concept-" in concept["edits"]


def test_definitions_module_imports_no_torch():
    code = "import sys, pipelines.definitions; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.slow
def test_dagster_validates_the_code_location():
    out = subprocess.run([str(Path(sys.executable).with_name("dagster")), "definitions", "validate", "-m",
                          "pipelines.definitions"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.slow
def test_tide_run_follows_the_graph_and_reuses_what_is_up_to_date(tiny_project):
    project = tiny_project(EDIT)
    seen: list[str] = []

    @dg.asset(deps=["sae_metrics"])
    def downstream_of_metrics() -> None:
        """A dummy asset added by the test: it must run after its parent without being listed anywhere."""
        seen.append("downstream_of_metrics")

    defs = dg.Definitions.merge(definitions_for(project), dg.Definitions(assets=[downstream_of_metrics]))
    instance = dg.DagsterInstance.ephemeral()
    first = materialize(defs, instance, log=lambda m: None)
    assert first.success and seen == ["downstream_of_metrics"]
    done = [s.asset for s in first.steps if s.executed]
    graph = defs.resolve_asset_graph()
    for i, name in enumerate(done):  # every asset runs after each of its parents
        for parent in graph.get(dg.AssetKey(name)).parent_keys:
            assert parent.to_user_string() in done[:i], (name, parent)
    assert set(done) == ASSETS | {"downstream_of_metrics"}
    # each asset partition once: 12 assets + the dummy, 3 shards and 2 (layer, site) partitions of 3 assets
    assert len(first.executed()) == len(set(first.executed())) == 13 + 2 + 3

    again = materialize(defs, instance, log=lambda m: None)
    assert again.executed() == [] and len(again.reused()) == len(first.executed())

    # a feature setting changes: its two assets go stale, and so does what reads their data
    write_config(project.config_path.parent, {**EDIT, "features": {"top_n": 3}, "model": {
        "digits": {"checkpoint_dir": project.config.model.digits.checkpoint_dir}}})
    changed = type(project).load(project.config_path)
    defs = dg.Definitions.merge(definitions_for(changed), dg.Definitions(assets=[downstream_of_metrics]))
    third = materialize(defs, instance, log=lambda m: None)
    assert third.executed() == ["feature_stats[00|resid]", "feature_stats[01|resid]", "top_images[00|resid]",
                                "top_images[01|resid]", "edits", "feature_dashboard"]
    assert next(s for s in third.steps if s.asset == "feature_stats").causes  # the UI's stale causes


@pytest.mark.slow
def test_automation_conditions_request_the_graph_in_order(tiny_project):
    """What the automation sensor does, tick by tick: each tick requests what is missing and whose parents
    are there or requested in the same run (same partitioning); runs execute in graph order."""
    project = tiny_project(EDIT)
    defs = definitions_for(project)
    instance = dg.DagsterInstance.ephemeral()
    cursor, waves = None, []
    for _ in range(8):  # evaluate, run what was requested, evaluate again
        result = dg.evaluate_automation_conditions(defs, instance, cursor=cursor)
        cursor = result.cursor
        wave = {k.to_user_string(): sorted(p or "" for p in result.get_requested_partitions(k))
                for k in defs.resolve_asset_graph().materializable_asset_keys if result.get_num_requested(k)}
        waves.append(wave)
        if not wave:
            break
        assert materialize(defs, instance, select=" or ".join(f"key:{k}" for k in wave), log=lambda m: None).success
    layers = ["00|resid", "01|resid"]
    assert waves == [{"dit_model": [""], "judge": [""], "activation_store": [""], "sample_quality": [""]},
                     {"activations": ["00000", "00001", "00002"]},
                     {"samples": [""]},
                     {"sae": layers, "feature_stats": layers, "top_images": layers},
                     {"sae_metrics": [""], "edits": [""], "feature_dashboard": [""]},
                     {}]  # everything up to date: nothing more is requested


def test_cli_run_keeps_its_runs_in_the_warehouse_instance(tiny_project):
    project = tiny_project()
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--config", str(project.config_path),
                          "--select", "key:dit_model"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    instance = dg.DagsterInstance.from_config(str(project.root / ".dagster"))
    runs = instance.get_runs()
    assert len(runs) == 1 and runs[0].asset_selection == {dg.AssetKey("dit_model")}
    assert "dit_model: missing, materializing" in out.stdout
