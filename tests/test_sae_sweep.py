"""The SAE sweep: its grid as Dagster partitions, its identity and code version across grid changes, and
points trained on the tiny project and published to `sae_sweep` / `v_sae_sweep_best`."""

from __future__ import annotations

import pytest

from pipelines.stages import capture
from pipelines.stages.sae_sweep import SweepError, run_point, sweep_id
from storage import Warehouse
from tests.conftest import quiet
from tide_core.config import ConfigError, parse_config

SWEEP = {"sweep": {"layers": [1], "lrs": [1e-3, 8e-3], "total_tokens": 4000}, "sae": {"eval_tokens": 2000}}


def test_the_grid_is_the_partitions_and_growing_it_keeps_the_points_fresh(tmp_path):
    from pipelines.definitions import build_definitions
    from pipelines.defs.versions import code_version
    from tests.conftest import write_config

    cfg = parse_config({"sweep": {"layers": [1, 3], "lrs": [1e-3, 4e-3], "ks": [16, 32]}}, origin="t")
    keys = [p.key for p in cfg.sweep.points(cfg.sae)]
    assert len(keys) == 8 and keys[0] == "L01-lr0.001-b1024-k16-n1024" and len(set(keys)) == 8
    grown = parse_config({"sweep": {"layers": [1, 3], "lrs": [1e-3, 4e-3, 1e-2], "ks": [16, 32]},
                          "sae": {"train": {"lr": 4e-3}}}, origin="t")
    assert code_version("sae_sweep", grown) == code_version("sae_sweep", cfg)
    assert sweep_id(grown, "run") == sweep_id(cfg, "run")
    other = parse_config({"sweep": {"layers": [1], "lrs": [1e-3], "total_tokens": 5}}, origin="t")
    assert sweep_id(other, "run") != sweep_id(cfg, "run")
    graph = build_definitions(str(write_config(tmp_path, SWEEP))).resolve_asset_graph()
    import dagster as dg

    node = graph.get(dg.AssetKey("sae_sweep"))
    assert node.partitions_def.get_partition_keys() == ["L01-lr0.001-b512-k4-n64", "L01-lr0.008-b512-k4-n64"]
    with pytest.raises(ConfigError, match="sweep.layers=\\[2\\]"):
        parse_config({"sweep": {"layers": [2]}}, origin="t")
    with pytest.raises(ConfigError, match="distinct"):
        parse_config({"sweep": {"lrs": [1e-3, 1e-3]}}, origin="t")


@pytest.mark.slow
def test_points_train_every_variant_and_the_best_view_picks_per_layer(tiny_project):
    ctx = quiet(tiny_project(SWEEP))
    capture.create_store(ctx)
    for shard in range(ctx.project.num_shards):
        capture.write_shard(ctx, shard)
    with pytest.raises(SweepError, match="not a point of the configured sweep"):
        run_point(ctx, "L01-lr0.5-b512-k4-n64")
    reports = [run_point(ctx, p.key) for p in ctx.config.sweep.points(ctx.config.sae)]
    assert all(set(r.nmse) == {"tide", "topk"} and r.tokens == 4000 for r in reports)
    wh = Warehouse(ctx.project.duckdb_path)
    rows = wh.query("SELECT point, variant, count(*) AS n, count(*) FILTER (WHERE step = -1) AS overall "
                    "FROM sae_sweep GROUP BY 1, 2 ORDER BY 1, 2").to_pylist()
    n_steps = len(ctx.store().layout.steps)
    assert [(r["n"], r["overall"]) for r in rows] == [(n_steps + 1, 1)] * 4
    best = {r["variant"]: r for r in wh.query("SELECT * FROM v_sae_sweep_best").to_pylist()}
    for variant, row in best.items():
        assert row["nmse"] == min(r.nmse[variant] for r in reports)
    run_point(ctx, reports[0].point.key)  # a rerun replaces its rows, never adds
    assert wh.query("SELECT count(*) FROM sae_sweep").column(0)[0].as_py() == 4 * (n_steps + 1)
