import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from pipelines.preflight import check, preflight
from pipelines.project import Project
from tests.conftest import write_config
from tide_core.config import TideConfig
from tide_core.models.base import ModelInfo
from tide_core.models.registry import family_of

Usage = namedtuple("Usage", "total used free")


def test_the_estimate_is_the_size_capture_writes(tiny_project):
    from pipelines.stages import capture
    from tests.conftest import quiet

    for name, overrides in [("full", {}), ("sub", {"capture": {"token_fraction": 0.25, "steps": [0, 3],
                                                               "sites": ["resid", "mlp"]}})]:
        project = tiny_project(overrides, name=name)
        estimate = check(project).store
        store = capture.create_store(quiet(project))  # the arrays capture fills, from the loaded model
        assert estimate.total_bytes == store.layout.act_bytes_per_sample() * store.layout.num_samples, name
        assert estimate.tokens == store.layout.tokens_stored


def test_token_grid_from_a_diffusers_directory_and_the_requested_size(tmp_path):
    from pipelines.store_size import token_count

    (tmp_path / "transformer").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "transformer" / "config.json").write_text('{"sample_size": 64, "patch_size": 2}')
    (tmp_path / "vae" / "config.json").write_text('{"block_out_channels": [128, 256, 512, 512]}')
    info = ModelInfo(family="pixart", source=str(tmp_path), num_layers=28, hidden_size=1152, sites=("resid",))
    cfg = TideConfig()
    assert token_count(cfg, info) == 32 * 32  # PixArt-512: 64 latents a side, patches of 2
    cfg.model.height, cfg.model.width = 1024, 512
    assert token_count(cfg, info) == 64 * 32
    hub = ModelInfo(family="dit", source="facebook/DiT-XL-2-256", num_layers=28, hidden_size=1152, sites=())
    cfg = TideConfig()
    cfg.model.source = hub.source
    assert token_count(cfg, hub) is None  # not on this machine: the CLI says the size is unknown


def test_a_store_larger_than_the_free_space_stops_the_run(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    path = write_config(tmp_path, {"sampling": {"num_samples": 4096}})
    project = Project.load(path)
    info = family_of(project.config.model).describe(project.config.model)
    need = 4096 * 4 * 2 * 1 * 64 * info.hidden_size * 2  # samples x steps x layers x sites x tokens x D x fp16
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - need // 2, need // 2))
    [problem] = preflight(project)
    assert f"the activation store needs about {need / 1e6:.1f} MB (4096 samples x 4 steps x 2 layers x 1 site " \
           f"x 64 tokens x {info.hidden_size} channels x 2 B) but {tmp_path} has {need / 2e6:.1f} MB free" in problem
    assert "capture.token_fraction = 1" in problem and "warehouse.root" in problem

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("TIDE_CONFIG", "")
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("[tide] preflight failed:") and "needs about" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tide.toml"]  # nothing written

    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 0, 10**12))
    assert preflight(project) == []


def test_tide_run_prints_the_estimate_in_its_preflight_line(tmp_path, monkeypatch, capsys):
    import pipelines.runner
    from pipelines.cli import main

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("TIDE_CONFIG", "")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 0, 5 * 10**9))
    ran = []
    stopped = namedtuple("Report", "success")(False)
    monkeypatch.setattr(pipelines.runner, "materialize", lambda *a, **k: ran.append(1) or stopped)
    assert main(["run", "--config", str(write_config(tmp_path))]) == 1  # stopped by the stub, after preflight
    out = capsys.readouterr().out
    assert ran and "[tide] preflight passed:" in out
    assert "the activation store takes about 786.4 KB (24 samples x 4 steps x 2 layers x 1 site x 64 tokens x 32 " \
           f"channels x 2 B); 5.0 GB free at {tmp_path}" in out


def test_a_resumed_run_needs_only_the_shards_still_to_write(tiny_project, monkeypatch):
    from pipelines.stages import capture
    from tests.conftest import quiet

    project = tiny_project()
    capture.create_store(quiet(project))
    capture.write_shard(quiet(project), 0)
    estimate = check(project).store
    assert estimate.done_fraction == pytest.approx(1 / 3)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 0, estimate.total_bytes * 0.7))
    assert preflight(project) == []  # two thirds of the store fit
    assert "524.3 KB of it still to write" in check(project).summary()


HOLD = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
con.execute("CREATE TABLE IF NOT EXISTS t (a INT)")
print("holding", flush=True)
time.sleep(60)
"""


def test_a_warehouse_file_held_by_another_process_is_named_with_its_pid(tmp_path):
    project = Project.load(write_config(tmp_path))
    project.root.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(project.duckdb_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        problems = preflight(project)
    finally:
        holder.kill()
        holder.wait()
    [problem] = problems
    assert f"the warehouse {project.duckdb_path} is held by process {holder.pid} (" in problem
    assert f"kill {holder.pid}" in problem and "another `tide run`" in problem
    assert preflight(project) == []  # released


def test_a_file_that_is_not_a_duckdb_database_is_named(tmp_path):
    project = Project.load(write_config(tmp_path))
    project.root.mkdir()
    Path(project.duckdb_path).write_bytes(b"not a database" * 500)
    [problem] = preflight(project)
    assert f"{project.duckdb_path} is not a DuckDB database" in problem and ".broken" in problem


def test_a_hub_model_not_cached_is_named_before_any_work(tmp_path, monkeypatch):
    from pipelines.preflight import _hub_unavailable

    source = "facebook/DiT-XL-2-256"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    problem = _hub_unavailable(source)
    assert problem is not None and "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in problem
    assert f"huggingface-cli download {source} --local-dir DIR" in problem
    # once the cache holds it (the layout huggingface_hub writes), nothing is asked of the network
    snapshot = tmp_path / "hub" / "models--facebook--DiT-XL-2-256" / "snapshots" / ("0" * 40)
    (snapshot / "transformer").mkdir(parents=True)
    (snapshot / "transformer" / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--facebook--DiT-XL-2-256" / "refs").mkdir()
    (tmp_path / "hub" / "models--facebook--DiT-XL-2-256" / "refs" / "main").write_text("0" * 40)
    assert _hub_unavailable(source) is None
    assert _hub_unavailable("digits") is None and _hub_unavailable(str(tmp_path)) is None
