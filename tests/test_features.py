"""Feature statistics: the chunked map-reduce against a brute-force computation, and the feature stage
end to end on the tiny project (dask threads and a dask.distributed LocalCluster, heatmaps, checks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tide_core.feature_stats import (
    EMPTY,
    chunk_partial,
    decoder_neighbors,
    heatmaps,
    merge_all,
    selectivity,
    summarise,
)
from tide_core.sae import SAESpec, SparseAutoencoder

D, N_LAT, K, P, C, TOP = 16, 32, 4, 6, 3, 5
STEPS, TIMESTEPS = [0, 1, 2], [900, 500, 100]


def tiny_sae(variant: str = "tide") -> SparseAutoencoder:
    sae = SparseAutoencoder(SAESpec(d_in=D, n_latents=N_LAT, k=K, variant=variant), seed=0)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)  # some latents fire often, some rarely
        if sae.time_mlp is not None:
            for p in sae.time_mlp.parameters():
                p.normal_(0, 0.2)  # a non-identity modulation, so the timestep matters
    return sae


def brute_force(sae, acts, classes):
    """Dense latents of every token: z [S, N_img, P, n] (the definition the pass must reproduce)."""
    out = []
    for a, t in zip(acts, TIMESTEPS, strict=True):
        x = torch.from_numpy(a.reshape(-1, D))
        tt = torch.full((len(x),), t) if sae.spec.variant == "tide" else None
        out.append(sae.encode(x, tt).detach().numpy().reshape(a.shape[0], P, N_LAT))
    return np.stack(out)


@pytest.mark.parametrize("variant", ["tide", "topk", "relu"])
def test_chunked_pass_equals_brute_force(variant):
    sae = tiny_sae(variant)
    rng = np.random.default_rng(0)
    n_img = 20
    acts = rng.normal(size=(len(STEPS), n_img, P, D)).astype(np.float32)  # [S, N, P, D]
    classes = rng.integers(0, C, n_img)
    shards = [np.arange(0, 7), np.arange(7, 14), np.arange(14, 20)]
    parts = []
    for a, (step, t) in enumerate(zip(STEPS, TIMESTEPS, strict=True)):
        chunks = [chunk_partial(sae, acts[a, ids], step, t, ids, classes[ids], C, TOP) for ids in shards]
        parts.append(merge_all(chunks[::-1] if a % 2 else chunks))  # merge order must not matter
    s = summarise(parts[::-1])
    z = brute_force(sae, acts, classes)  # [S, N, P, n]
    fired = z > 0
    np.testing.assert_allclose(s.step_fire_rate(), fired.mean((1, 2)))
    np.testing.assert_allclose(s.fire_rate(), fired.mean((0, 1, 2)))
    with np.errstate(invalid="ignore"):
        mean = z.sum((0, 1, 2)) / fired.sum((0, 1, 2))
    np.testing.assert_allclose(s.mean_act(), mean, rtol=1e-5)
    np.testing.assert_allclose(s.max_act(), z.max((0, 1, 2)), rtol=1e-6)
    for c in range(C):
        np.testing.assert_allclose(s.class_rates()[c], fired[:, classes == c].mean((0, 1, 2)))
    assert s.hist.sum(1).tolist() == fired.sum((0, 1, 2)).tolist()
    # top images overall: per image the max over steps and tokens, the TOP strongest images
    per_image = z.max(2)  # [S, N, n]
    best = per_image.max(0)  # [N, n]
    top = s.top_overall()
    for f in range(N_LAT):
        live = np.flatnonzero(best[:, f] > 0)
        want = live[np.argsort(-best[live, f], kind="stable")][:TOP]
        got = top.sample_id[f][top.value[f] > EMPTY]
        np.testing.assert_allclose(top.value[f][: len(got)], best[want, f], rtol=1e-6)
        assert set(got) == set(want) or np.allclose(np.sort(best[got, f]), np.sort(best[want, f]))
        assert all(per_image[STEPS.index(st), sid, f] == best[sid, f] for sid, st in
                   zip(got, top.step[f][: len(got)], strict=True))
    peak = s.top_at_peak()
    axis = s.step_fire_rate().argmax(0)
    for f in np.flatnonzero(s.fire_rate() > 0):
        vals = np.sort(per_image[axis[f], :, f])[::-1]
        n = int((vals > 0).sum())
        np.testing.assert_allclose(peak.value[f][: min(n, TOP)], vals[: min(n, TOP)], rtol=1e-6)
        assert (peak.step[f] == STEPS[axis[f]]).all()


def test_selectivity_spans_zero_to_one():
    rates = np.array([[0.2, 0.5, 0.0], [0.2, 0.0, 0.0], [0.2, 0.0, 0.0]])  # [C, n]
    sel = selectivity(rates)
    assert sel[0] == pytest.approx(0.0) and sel[1] == pytest.approx(1.0) and np.isnan(sel[2])


def test_decoder_neighbors_match_brute_force():
    w = torch.randn(50, 8)
    nb = decoder_neighbors(w, 3, block=16)
    wn = torch.nn.functional.normalize(w, dim=1)
    sim = (wn @ wn.T).fill_diagonal_(-2)
    want = sim.topk(3, dim=1)
    assert (nb.ids == want.indices.numpy()).all()
    np.testing.assert_allclose(nb.cosine, want.values.numpy(), rtol=1e-5)


def test_heatmaps_are_the_dense_latents():
    sae = tiny_sae()
    acts = np.random.default_rng(1).normal(size=(4, P, D)).astype(np.float32)
    x = torch.from_numpy(acts.reshape(-1, D))
    dense = sae.encode(x, torch.full((len(x),), TIMESTEPS[0])).detach().numpy().reshape(4, P, N_LAT)
    rows, latents = np.array([0, 3, 3, 0]), np.array([5, 7, 5, 5])
    got = heatmaps(sae, acts, TIMESTEPS[0], rows, latents)
    np.testing.assert_array_equal(got, dense[rows, :, latents])


# ------------------------------------------------------------------------------ the stage, end to end

SAE_CFG = {"sae": {"n_latents": 64, "k": 4, "train_tokens": 6000, "batch_size": 512, "eval_tokens": 2000,
                   "splice_samples": 0, "checkpoint_every_tokens": 5000, "variants": ["tide", "topk"]},
           "features": {"top_n": 4, "neighbors": 3}}


def trained(project, layer=1):
    from pipelines import capture_ops, sae_ops

    capture_ops.create_store(project)
    for shard in range(project.num_shards):
        capture_ops.write_shard(project, shard)
    return project, sae_ops.train_layer(project, layer, log=lambda m: None)


def test_feature_stage_needs_trained_saes(tiny_project):
    from pipelines import capture_ops, feature_ops
    from storage.activation_store import StoreError

    project = tiny_project(SAE_CFG)
    capture_ops.create_store(project)
    with pytest.raises(StoreError, match="incomplete shards"):
        feature_ops.build_feature_stats(project, 1)
    for shard in range(project.num_shards):
        capture_ops.write_shard(project, shard)
    with pytest.raises(StoreError, match="layer 7 was not captured"):
        feature_ops.build_feature_stats(project, 7)
    with pytest.raises(feature_ops.FeatureError, match="materialize the `sae` asset's partition 01"):
        feature_ops.build_feature_stats(project, 1)


@pytest.mark.slow
def test_feature_stage_publishes_checked_tables(tiny_project):
    from pipelines import feature_ops
    from pipelines.capture_ops import open_store
    from storage.warehouse import UnknownSaeError, Warehouse

    project, sae_report = trained(tiny_project(SAE_CFG))
    with pytest.raises(feature_ops.FeatureError, match="materialize `feature_stats`"):
        feature_ops.build_top_images(project, 1)
    report = feature_ops.build_layer_features(project, 1, log=lambda m: None)
    assert {r.variant for r in report.saes} == {"tide", "topk"}
    ids = [r.sae_id for r in report.saes]
    for outcome in [*feature_ops.check_feature_stats(project, ids).values(),
                    *feature_ops.check_top_images(project, ids).values()]:
        assert outcome.passed, outcome
    wh = Warehouse(project.duckdb_path)
    store = open_store(project)
    n_steps, tokens = len(store.layout.steps), store.layout.num_samples * store.layout.tokens_total
    counts = wh.query("SELECT (SELECT count(*) FROM feature_stats) AS fs, (SELECT count(*) FROM features) AS f, "
                      "(SELECT count(*) FROM feature_classes) AS fc, (SELECT count(*) FROM feature_neighbors) AS nb"
                      ).to_pylist()[0]
    assert counts == {"fs": 2 * 64 * n_steps, "f": 2 * 64, "fc": 2 * 64 * 10, "nb": 2 * 64 * 3}
    # the published numbers are the brute-force ones for the stored activations
    sae = feature_ops.load_sae(wh.require_sae(ids[0]), store)
    acts = store.array("resid", 1)[:]  # [S, N, P, D]
    timesteps = store.provenance["capture_timesteps"]
    fired = np.zeros(64)
    for a in range(n_steps):
        x = torch.from_numpy(acts[a].reshape(-1, acts.shape[-1]).astype(np.float32))
        fired += (sae.encode(x, torch.full((len(x),), timesteps[a])) > 0).sum(0).numpy()
    rates = wh.query("SELECT fire_rate FROM features WHERE sae_id = ? ORDER BY feature_id", [ids[0]])
    np.testing.assert_allclose(rates.column(0).to_numpy(), fired / (tokens * n_steps), rtol=1e-6)
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
    # a rerun with the same SAEs and settings reuses the statistics and top images on record
    logs: list[str] = []
    feature_ops.build_layer_features(project, 1, log=logs.append)
    assert sum("reusing" in m for m in logs) == 4  # two SAEs x (statistics, top images)
    # other settings recompute, replace the partitions instead of adding rows, and rebuild top images
    top3 = tiny_project({**SAE_CFG, "features": {"top_n": 3}})
    top3 = type(top3)(config=top3.config, config_path=project.config_path, base_dir=project.base_dir)
    logs.clear()
    feature_ops.build_feature_stats(top3, 1, log=logs.append)
    assert not any("reusing" in m for m in logs)
    assert wh.query("SELECT count(*) FROM features").column(0)[0].as_py() == 128
    assert wh.query("SELECT count(*) FROM top_images").column(0)[0].as_py() == 0
    assert sum(feature_ops.build_top_images(top3, 1, log=lambda m: None).values()) > 0
    assert wh.query("SELECT max(rank) FROM top_images").column(0)[0].as_py() == 3

    # the same pass on a dask.distributed cluster gives the same statistics
    from distributed import LocalCluster

    threads = feature_ops.statistics_pass(store, sae, 1, 4).summary
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
        remote = feature_ops.statistics_pass(store, sae, 1, 4, scheduler=cluster.scheduler_address).summary
    for name in ("fires", "act_max", "hist", "top_sid"):
        np.testing.assert_array_equal(getattr(remote, name), getattr(threads, name))

    # re-publishing the SAEs (new weights under the same ids) drops their now-stale feature and edit rows
    from pipelines import sae_ops

    wh.replace_partition("edits", {"sae_id": ids[0]}, [{"edit_id": "e0", "sample_id": 0, "op": "add"}])
    sae_ops.publish(project, sae_report)
    left = wh.query("SELECT (SELECT count(*) FROM features) + (SELECT count(*) FROM top_images) "
                    "+ (SELECT count(*) FROM edits)").column(0)
    assert left[0].as_py() == 0 and not feature_ops.summary_path(project, ids[0]).exists()


@pytest.mark.slow
def test_subsampled_capture_recomputes_full_heatmaps(tiny_project):
    from pipelines import capture_ops, feature_ops
    from pipelines.capture_run import recapture_full_grid
    from storage.warehouse import Warehouse

    project, _ = trained(tiny_project({**SAE_CFG, "capture": {"token_fraction": 0.5}}))
    store = capture_ops.open_store(project)
    ids = np.array([3, 17])
    grids = recapture_full_grid(capture_ops.capture_plan(project), 1, "resid", {2: ids})[2]  # [2, T, D]
    stored = store.read_step("resid", 1, 2)[ids]  # [2, P, D], the captured subset
    index = store.token_index(0, store.layout.num_samples)[store.layout.step_axis(2), ids]  # [2, P]
    recomputed = np.take_along_axis(grids, index[:, :, None].astype(np.int64), 1).astype(np.float16)
    np.testing.assert_allclose(recomputed.astype(np.float32), stored.astype(np.float32), rtol=2e-3, atol=2e-3)
    feature_ops.build_layer_features(project, 1, log=lambda m: None)
    rows = Warehouse(project.duckdb_path).query(
        "SELECT min(len(heatmap)) AS n, min(list_max(heatmap) - activation) AS gap FROM top_images").to_pylist()[0]
    assert rows["n"] == store.layout.tokens_total  # full grid, though half the tokens were stored
    assert rows["gap"] >= -1e-3  # the full grid holds at least the captured tokens' maximum
    # another sampler than the store's would give other activations: refused before re-sampling
    from storage.activation_store import StoreMismatchError

    other = tiny_project({**SAE_CFG, "capture": {"token_fraction": 0.5}, "sampling": {"guidance_scale": 1.0}})
    other = type(other)(config=other.config, config_path=project.config_path, base_dir=project.base_dir)
    with pytest.raises(StoreMismatchError, match="guidance_scale"):
        feature_ops.resampling_plan(other, store)


@pytest.mark.slow
def test_killed_statistics_run_is_redone_not_reused(tiny_project, monkeypatch):
    from pipelines import feature_ops
    from storage.warehouse import Warehouse

    project, _ = trained(tiny_project(SAE_CFG))
    feature_ops.build_feature_stats(project, 1, log=lambda m: None)
    two = tiny_project({**SAE_CFG, "features": {"top_n": 4, "neighbors": 2}})
    two = type(two)(config=two.config, config_path=project.config_path, base_dir=project.base_dir)
    replace = Warehouse.replace_partition

    def killed_at_neighbors(self, table, where, rows):
        if table == "feature_neighbors":
            raise KeyboardInterrupt("killed")
        return replace(self, table, where, rows)

    monkeypatch.setattr(Warehouse, "replace_partition", killed_at_neighbors)
    with pytest.raises(KeyboardInterrupt):
        feature_ops.build_feature_stats(two, 1, log=lambda m: None)
    monkeypatch.setattr(Warehouse, "replace_partition", replace)
    logs: list[str] = []
    feature_ops.build_feature_stats(two, 1, log=logs.append)
    assert not any("reusing" in m for m in logs)
    wh = Warehouse(project.duckdb_path)
    assert wh.query("SELECT max(rank) FROM feature_neighbors").column(0)[0].as_py() == 2


def test_a_damaged_summary_is_not_on_record(tmp_path):
    from pipelines.feature_ops import summary_key

    path = tmp_path / "s.npz"
    np.savez(path, key=np.array("k1"), tokens=np.arange(3))
    assert summary_key(path) == "k1"
    whole = path.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"", b"not a zip"):
        path.write_bytes(damaged)
        assert summary_key(path) == ""  # so the statistics are computed again
    assert summary_key(tmp_path / "missing.npz") == ""


def test_histogram_bins_follow_the_edges_exactly():
    from tide_core.feature_stats import BIN_EDGE, BIN_FIRST, BIN_KEY0, HIST_EDGES, _hist_bin

    bins = len(HIST_EDGES) - 1
    rng = np.random.default_rng(4)
    near = np.concatenate([HIST_EDGES * f for f in (1 - 1e-7, 1.0, 1 + 1e-7)])  # around every edge
    v = np.concatenate([10 ** rng.uniform(-5, 5, 20000), near, [1e-30, 3e38]]).astype(np.float32)
    want = np.clip(np.searchsorted(HIST_EDGES, v.astype(np.float64), side="right") - 1, 0, bins - 1)
    got = np.array([_hist_bin(x, BIN_KEY0, BIN_FIRST, BIN_EDGE) for x in v])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("variant", ["tide", "topk"])
def test_fused_topk_counts_equal_the_general_path(variant):
    # chunk_partial's compiled select-and-count sweep against fired_latents + _accumulate (what relu SAEs
    # and rows with a NaN go through)
    from tide_core import feature_stats as fs

    sae = tiny_sae(variant)
    acts = np.random.default_rng(5).normal(size=(9, P, D)).astype(np.float32)
    x, classes = torch.from_numpy(acts.reshape(-1, D)), np.arange(9) % C
    fast, general = fs._Counts.zeros(C, N_LAT, 9), fs._Counts.zeros(C, N_LAT, 9)
    assert fs._count_topk(fs._fast_encoder(sae, TIMESTEPS[1]), x.numpy(), P, 0, classes, fast) == len(x)
    f = fs.fired_latents(sae, x, TIMESTEPS[1])
    fs._accumulate(f.rows.numpy(), f.latents.numpy(), f.values.numpy(), P, 0, classes, *general.args())
    for a, b in zip(fast.args()[3:], general.args()[3:], strict=True):
        np.testing.assert_array_equal(a, b)
    x[4, 2] = float("nan")  # a NaN row: the sweep stops before its tile, the rest takes the general path
    enc = fs._fast_encoder(sae, TIMESTEPS[1])
    assert fs._count_topk(enc, x.numpy(), P, 0, classes, fs._Counts.zeros(C, N_LAT, 9)) == 0


def test_step_partial_over_chunks_equals_merged_chunk_partials():
    # a feature-pass task counts several chunks of a step into one set of arrays; merging one partial per
    # chunk must give the same statistics (NaN rows in one chunk take the general path there)
    from tide_core.feature_stats import Chunk, step_partial

    sae = tiny_sae("tide")
    rng = np.random.default_rng(6)
    acts = rng.normal(size=(3, 5, P, D)).astype(np.float32)  # 3 chunks of 5 images
    acts[1, 2, 3, 0] = np.nan
    ids = np.arange(15).reshape(3, 5) + 100
    classes = rng.integers(0, C, (3, 5))
    one = step_partial(sae, (Chunk(a, i, c) for a, i, c in zip(acts, ids, classes, strict=True)), 15, 1,
                       TIMESTEPS[1], C, TOP)
    merged = merge_all([chunk_partial(sae, a, 1, TIMESTEPS[1], i, c, C, TOP)
                        for a, i, c in zip(acts, ids, classes, strict=True)])
    for name in ("tokens", "class_tokens", "fires", "hist", "act_max", "top_val", "top_sid"):
        np.testing.assert_array_equal(getattr(one, name), getattr(merged, name), err_msg=name)
    np.testing.assert_allclose(one.act_sum, merged.act_sum, rtol=1e-12)
    with pytest.raises(ValueError, match="told of 16 images but got 15"):
        step_partial(sae, (Chunk(a, i, c) for a, i, c in zip(acts, ids, classes, strict=True)), 16, 1,
                     TIMESTEPS[1], C, TOP)
