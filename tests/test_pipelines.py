import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from pipelines.definitions import CAPTURE_JOB, MODEL_JOB, PUBLISH_JOB, build_definitions

REPO = Path(__file__).resolve().parent.parent


def test_definitions_load_for_the_default_config():
    defs = build_definitions(str(REPO / "tide.toml"))
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"digits", "dit_model", "digit_classifier", "sample_quality", "activation_store", "activations",
            "samples", "sae", "sae_metrics"} <= keys
    for name in (MODEL_JOB, CAPTURE_JOB, PUBLISH_JOB):
        assert defs.resolve_job_def(name) is not None
    sched = defs.resolve_schedule_def("daily_tide_pipeline")
    assert sched.default_status == dg.DefaultScheduleStatus.STOPPED
    parts = defs.resolve_assets_def("activations").partitions_def.get_partition_keys()
    assert parts == [f"{i:05d}" for i in range(8)]  # 512 samples / 64 per shard


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
def test_model_job_materializes_with_metadata(tiny_project):
    project = tiny_project()
    defs = build_definitions(str(project.config_path))
    instance = dg.DagsterInstance.ephemeral()
    result = defs.resolve_job_def(MODEL_JOB).execute_in_process(instance=instance)
    assert result.success
    mats = {m.asset_key.to_user_string(): m for m in result.asset_materializations_for_node("sample_quality")}
    md = mats["sample_quality"].metadata
    assert 0.0 <= md["class_accuracy"].value <= 1.0 and md["frechet_distance"].value >= 0
    assert md["samples_by_class"].value.startswith("![samples](data:image/png;base64,")
    judge = result.asset_materializations_for_node("digit_classifier")[0].metadata
    assert "test_accuracy" in judge
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert "judge_is_accurate" in checks and "samples_are_recognisable" in checks
    for key in ["00000", "00001", "00002"]:
        assert defs.resolve_job_def(CAPTURE_JOB).execute_in_process(instance=instance, partition_key=key).success
    pub = defs.resolve_job_def(PUBLISH_JOB).execute_in_process(instance=instance)
    assert pub.success
    checks = {c.check_name: c.passed for c in pub.get_asset_check_evaluations()}
    assert checks == {"shards_complete": True, "activations_finite": True, "shapes_match_provenance": True}


@pytest.mark.slow
def test_sample_quality_is_reused_while_model_sampler_and_judge_match(tiny_project):
    from pipelines import model_ops

    project = tiny_project({"model": {"judge": {"quality_samples": 20}}})
    logs: list[str] = []
    first = model_ops.measure_quality(project, log=logs.append)
    assert not any("reusing" in m for m in logs)
    again = model_ops.measure_quality(project, log=logs.append)
    assert any("reusing" in m for m in logs)
    assert (again.accuracy, again.frechet_distance, again.grid_png) == (first.accuracy, first.frechet_distance,
                                                                         first.grid_png)
    # another sampler setting, same directory: measured again
    other = tiny_project({"model": {"judge": {"quality_samples": 20}}, "sampling": {"guidance_scale": 1.0}})
    logs.clear()
    model_ops.measure_quality(other, log=logs.append)
    assert not any("reusing" in m for m in logs)
