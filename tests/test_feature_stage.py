"""The feature stage end to end on the tiny project: statistics tables (dask threads and a dask.distributed
LocalCluster), top images with full-grid heatmaps, the checks, and replacement of stale rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.stages import capture, features, top_images
from pipelines.stages import sae as sae_stage
from storage import StoreError, StoreMismatchError, UnknownSaeError, Warehouse
from tests.conftest import quiet

SAE_CFG = {"sae": {"train": {"total_tokens": 6000}, "eval_tokens": 2000, "splice_samples": 0},
           "features": {"top_n": 4, "neighbors": 3}}


def trained(project, layer=1):
    ctx = quiet(project)
    capture.create_store(ctx)
    for shard in range(project.num_shards):
        capture.write_shard(ctx, shard)
    return ctx, sae_stage.train_layer(ctx, layer, "resid")


def test_feature_stage_needs_a_complete_store(tiny_project):
    ctx = quiet(tiny_project(SAE_CFG))
    capture.create_store(ctx)
    with pytest.raises(StoreError, match="incomplete shards"):
        features.build_feature_stats(ctx, 1, "resid")


def test_feature_stage_needs_trained_saes(tiny_project):
    ctx = quiet(tiny_project(SAE_CFG))
    capture.create_store(ctx)
    for shard in range(ctx.project.num_shards):
        capture.write_shard(ctx, shard)
    with pytest.raises(StoreError, match=r"\(resid, layer 7\) was not captured"):
        features.build_feature_stats(ctx, 7, "resid")
    with pytest.raises(features.FeatureError, match=r"materialize the `sae` asset's partition 01\|resid"):
        features.build_feature_stats(ctx, 1, "resid")


@pytest.mark.slow
def test_feature_stage_publishes_checked_tables(tiny_project):
    ctx, sae_report = trained(tiny_project(SAE_CFG))
    with pytest.raises(features.FeatureError, match="materialize `feature_stats`"):
        top_images.build_top_images(ctx, 1, "resid")
    report = features.build_feature_stats(ctx, 1, "resid")
    top_images.build_top_images(ctx, 1, "resid")
    assert {r.variant for r in report.saes} == {"tide", "topk"}
    ids = [r.sae_id for r in report.saes]
    for outcome in [*features.check_feature_stats(ctx, ids).values(),
                    *top_images.check_top_images(ctx, ids).values()]:
        assert outcome.passed, outcome
    wh = Warehouse(ctx.project.duckdb_path)
    store = ctx.store()
    n_steps, tokens = len(store.layout.steps), store.layout.num_samples * store.layout.tokens_total
    counts = wh.query("SELECT (SELECT count(*) FROM feature_stats) AS fs, (SELECT count(*) FROM features) AS f, "
                      "(SELECT count(*) FROM feature_neighbors) AS nb").to_pylist()[0]
    assert counts == {"fs": 2 * 64 * n_steps, "f": 2 * 64, "nb": 2 * 64 * 3}
    # the published numbers are the brute-force ones for the stored activations
    sae = features.load_sae(wh.require_sae(ids[0]), store)
    acts = store.array("resid", 1)[:]  # [S, N, P, D]
    timesteps = store.provenance["capture_timesteps"]
    classes = store.samples()["class_id"]  # [N]
    fired_by_image = np.zeros((len(classes), 64))  # [N, n]
    for a in range(n_steps):
        x = torch.from_numpy(acts[a].reshape(-1, acts.shape[-1]).astype(np.float32))
        z = sae.encode(x, torch.full((len(x),), timesteps[a])).reshape(*acts.shape[1:3], 64)  # [N, P, n]
        fired_by_image += (z > 0).sum(1).numpy()
    fired = fired_by_image.sum(0)
    rates = wh.query("SELECT fire_rate FROM features WHERE sae_id = ? ORDER BY feature_id", [ids[0]])
    np.testing.assert_allclose(rates.column(0).to_numpy(), fired / (tokens * n_steps), rtol=1e-6)
    # one class concept per (feature, class) where the feature fired, at its per-class rate
    names = store.provenance["class_names"]
    expect = {}
    for c in range(len(names)):
        on = fired_by_image[classes == c].sum(0)  # [n]
        denom = (classes == c).sum() * store.layout.tokens_total * n_steps
        expect.update({(f, str(names[c])): on[f] / denom for f in np.nonzero(on)[0].tolist()})
    got = {(r["feature_id"], r["concept"]): r for r in wh.query(
        "SELECT * FROM feature_concepts WHERE sae_id = ?", [ids[0]]).to_pylist()}
    assert set(got) == set(expect) and {r["kind"] for r in got.values()} == {"class"}
    np.testing.assert_allclose([got[k]["fire_rate"] for k in expect], list(expect.values()), rtol=1e-6)
    np.testing.assert_allclose([got[k]["lift"] for k in expect],
                               [v / (fired[f] / (tokens * n_steps)) for (f, _), v in expect.items()], rtol=1e-6)
    # heatmaps cover the full grid and peak at the ranked activation
    diff = wh.query("SELECT max(abs(list_max(heatmap) - activation)) AS d, min(len(heatmap)) AS n FROM top_images"
                    ).to_pylist()[0]
    assert diff["d"] < 1e-5 and diff["n"] == store.layout.tokens_total
    top = wh.top_images(ids[0], int(rates.column(0).to_numpy().argmax()), limit=3)
    assert top.column("rank").to_pylist() == [1, 2, 3]
    with pytest.raises(UnknownSaeError, match="Known SAEs"):
        wh.top_images("L01-nope", 0)
    with pytest.raises(ValueError, match="features 0..63"):
        wh.feature(ids[0], 64)

    # the same pass on a dask.distributed cluster gives the same statistics
    from distributed import LocalCluster

    threads = features.statistics_pass(store, sae, 1, "resid", 4).summary
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
        remote = features.statistics_pass(store, sae, 1, "resid", 4, scheduler=cluster.scheduler_address).summary
    for name in ("fires", "act_max", "hist", "top_sid"):
        np.testing.assert_array_equal(getattr(remote, name), getattr(threads, name))

    # re-publishing the SAEs (new weights under the same ids) drops their now-stale feature and edit rows
    wh.replace_partition("edits", {"sae_id": ids[0]}, [{"edit_id": "e0", "sample_id": 0, "op": "add"}])
    sae_stage.publish(ctx, sae_report)
    left = wh.query("SELECT (SELECT count(*) FROM features) + (SELECT count(*) FROM top_images) "
                    "+ (SELECT count(*) FROM edits)").column(0)
    assert left[0].as_py() == 0 and not features.summary_path(ctx, ids[0]).exists()


@pytest.mark.slow
def test_new_feature_settings_replace_the_partition(tiny_project):
    ctx, _ = trained(tiny_project(SAE_CFG))
    features.build_feature_stats(ctx, 1, "resid")
    top_images.build_top_images(ctx, 1, "resid")
    top3 = tiny_project({**SAE_CFG, "features": {"top_n": 3}})
    top3 = quiet(type(top3)(config=top3.config.model_copy(update={"warehouse": ctx.config.warehouse}),
                            config_path=ctx.project.config_path))
    features.build_feature_stats(top3, 1, "resid")
    wh = Warehouse(ctx.project.duckdb_path)
    assert wh.query("SELECT count(*) FROM features").column(0)[0].as_py() == 128  # replaced, not added
    assert wh.query("SELECT count(*) FROM top_images").column(0)[0].as_py() == 0  # they described the old pass
    assert sum(top_images.build_top_images(top3, 1, "resid").values()) > 0
    assert wh.query("SELECT max(rank) FROM top_images").column(0)[0].as_py() == 3


@pytest.mark.slow
def test_subsampled_capture_recomputes_full_heatmaps(tiny_project):
    ctx, _ = trained(tiny_project({**SAE_CFG, "capture": {"token_fraction": 0.5}}))
    store = ctx.store()
    ids = np.array([3, 17])
    grids = capture.recapture_full_grid(capture.make_plan(ctx), 1, "resid", {2: ids})[2]  # [2, T, D]
    stored = store.read_step("resid", 1, 2)[ids]  # [2, P, D], the captured subset
    index = store.token_index(0, store.layout.num_samples)[store.layout.step_axis(2), ids]  # [2, P]
    recomputed = np.take_along_axis(grids, index[:, :, None].astype(np.int64), 1).astype(np.float16)
    np.testing.assert_allclose(recomputed.astype(np.float32), stored.astype(np.float32), rtol=2e-3, atol=2e-3)
    features.build_feature_stats(ctx, 1, "resid")
    top_images.build_top_images(ctx, 1, "resid")
    rows = Warehouse(ctx.project.duckdb_path).query(
        "SELECT min(len(heatmap)) AS n, min(list_max(heatmap) - activation) AS gap FROM top_images").to_pylist()[0]
    assert rows["n"] == store.layout.tokens_total  # full grid, though half the tokens were stored
    assert rows["gap"] >= -1e-3  # the full grid holds at least the captured tokens' maximum
    # another sampler than the store's would give other activations: refused before re-sampling
    other = tiny_project({**SAE_CFG, "capture": {"token_fraction": 0.5}, "sampling": {"guidance_scale": 1.0}})
    other = quiet(type(other)(config=other.config.model_copy(update={"warehouse": ctx.config.warehouse}),
                              config_path=ctx.project.config_path))
    with pytest.raises(StoreMismatchError, match="guidance_scale"):
        top_images.resampling_plan(other, store)


@pytest.mark.slow
def test_a_statistics_run_killed_between_tables_leaves_the_old_rows(tiny_project, monkeypatch):
    from storage.writes import Writes

    ctx, _ = trained(tiny_project(SAE_CFG))
    features.build_feature_stats(ctx, 1, "resid")
    wh = Warehouse(ctx.project.duckdb_path)
    before = wh.query("SELECT * FROM feature_neighbors ORDER BY ALL")
    two = tiny_project({**SAE_CFG, "features": {"top_n": 4, "neighbors": 2}})
    two = quiet(type(two)(config=two.config.model_copy(update={"warehouse": ctx.config.warehouse}),
                          config_path=ctx.project.config_path))
    replace = Writes.replace_partition

    def killed_at_neighbors(self, table, where, rows):
        if table == "feature_neighbors":
            raise KeyboardInterrupt("killed")
        return replace(self, table, where, rows)

    monkeypatch.setattr(Writes, "replace_partition", killed_at_neighbors)
    with pytest.raises(KeyboardInterrupt):
        features.build_feature_stats(two, 1, "resid")
    assert wh.query("SELECT * FROM feature_neighbors ORDER BY ALL").equals(before)  # the transaction rolled back
    monkeypatch.setattr(Writes, "replace_partition", replace)
    features.build_feature_stats(two, 1, "resid")
    assert wh.query("SELECT max(rank) FROM feature_neighbors").column(0)[0].as_py() == 2
