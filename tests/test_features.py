"""Feature statistics: the chunked map-reduce against a brute-force computation, on both kernel backends
(the stage end to end is tests/test_feature_stage.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from kernel_backends import BACKENDS, use_backend

from tide_core import kernels
from tide_core.features import (
    EMPTY,
    Chunk,
    chunk_encoder,
    chunk_partial,
    count_chunk,
    decoder_neighbors,
    fired_latents,
    heatmaps,
    merge_all,
    selectivity,
    step_partial,
    summarise,
)
from tide_core.kernels import backend as kernels_backend
from tide_core.sae import SAESpec, SparseAutoencoder

D, N_LAT, K, P, C, TOP = 16, 32, 4, 6, 3, 5
STEPS, TIMESTEPS = [0, 1, 2], [900, 500, 100]

backend = pytest.fixture(params=BACKENDS)(use_backend)


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
def test_chunked_pass_equals_brute_force(backend, variant):
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


def test_heatmaps_are_the_dense_latents(backend):
    sae = tiny_sae()
    acts = np.random.default_rng(1).normal(size=(4, P, D)).astype(np.float32)
    x = torch.from_numpy(acts.reshape(-1, D))
    dense = sae.encode(x, torch.full((len(x),), TIMESTEPS[0])).detach().numpy().reshape(4, P, N_LAT)
    rows, latents = np.array([0, 3, 3, 0]), np.array([5, 7, 5, 5])
    got = heatmaps(sae, acts, TIMESTEPS[0], rows, latents)
    np.testing.assert_array_equal(got, dense[rows, :, latents])


def test_histogram_bins_follow_the_edges_exactly(backend):
    # the compiled counting finds a value's bin by a table lookup on its bits, not a log: each value is
    # counted for a latent of its own, so every bin can be read back
    bins = len(kernels.HIST_EDGES) - 1
    edges = kernels.HIST_EDGES
    rng = np.random.default_rng(4)
    near = np.concatenate([edges * f for f in (1 - 1e-7, 1.0, 1 + 1e-7)])  # around every edge
    v = np.concatenate([10 ** rng.uniform(-5, 5, 20000), near, [1e-30, 3e38]]).astype(np.float32)
    want = np.clip(np.searchsorted(edges, v.astype(np.float64), side="right") - 1, 0, bins - 1)
    counts = kernels.FeatureCounts.zeros(1, len(v), 1)
    kernels.count_fired(counts, np.zeros(len(v)), np.arange(len(v)), v, len(v), 0, np.zeros(1, np.int64))
    assert (counts.hist.sum(1) == 1).all()
    np.testing.assert_array_equal(counts.hist.argmax(1), want)


@pytest.mark.parametrize("variant", ["tide", "topk"])
def test_fused_topk_counts_equal_the_general_path(backend, variant):
    # chunk_partial's select-and-count sweep against fired_latents + count_fired (what relu SAEs and rows
    # with a NaN go through)
    sae = tiny_sae(variant)
    acts = np.random.default_rng(5).normal(size=(9, P, D)).astype(np.float32)
    x, classes = torch.from_numpy(acts.reshape(-1, D)), np.arange(9) % C
    fast, general = kernels.FeatureCounts.zeros(C, N_LAT, 9), kernels.FeatureCounts.zeros(C, N_LAT, 9)
    assert count_chunk(chunk_encoder(sae, TIMESTEPS[1]), x.numpy(), P, 0, classes, fast) == len(x)
    f = fired_latents(sae, x, TIMESTEPS[1])
    kernels.count_fired(general, f.rows.numpy(), f.latents.numpy(), f.values.numpy(), P, 0, classes)
    for name in ("fires", "act_sum", "hist", "per_image"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(general, name), err_msg=name)
    x[4, 2] = float("nan")  # a NaN row: the sweep stops before its tile, the rest takes the general path
    enc = chunk_encoder(sae, TIMESTEPS[1])
    assert count_chunk(enc, x.numpy(), P, 0, classes, kernels.FeatureCounts.zeros(C, N_LAT, 9)) == 0


def _three_chunks(seed: int = 6):
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(3, 5, P, D)).astype(np.float32)  # 3 chunks of 5 images
    acts[1, 2, 3, 0] = np.nan
    ids = np.arange(15).reshape(3, 5) + 100
    classes = rng.integers(0, C, (3, 5))
    return acts, ids, classes


def test_step_partial_over_chunks_equals_merged_chunk_partials(backend):
    # a feature-pass task counts several chunks of a step into one set of arrays; merging one partial per
    # chunk must give the same statistics (NaN rows in one chunk take the general path there)
    sae = tiny_sae("tide")
    acts, ids, classes = _three_chunks()
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


@pytest.mark.skipif(os.environ.get(kernels_backend.ENV, "").strip().lower() == "torch",
                    reason="TIDE_KERNELS=torch: the compiled kernels are switched off")
@pytest.mark.parametrize("variant", ["tide", "topk", "relu"])
def test_the_backends_give_the_same_statistics(variant):
    # the pure torch/numpy kernels against the compiled ones: every statistic of a step bit for bit (a
    # coarse input makes ties in the top-k and in the top images; one chunk holds a NaN row)
    sae = tiny_sae(variant)
    acts, ids, classes = _three_chunks()
    acts = np.round(acts * 4) / 4
    parts = {}
    for mode in BACKENDS:
        with kernels_backend.forced(mode):
            chunks = (Chunk(a, i, c) for a, i, c in zip(acts, ids, classes, strict=True))
            parts[mode] = [step_partial(sae, chunks, 15, 1, TIMESTEPS[1], C, 2),
                           merge_all([chunk_partial(sae, a, 1, TIMESTEPS[1], i, c, C, 2)
                                      for a, i, c in zip(acts, ids, classes, strict=True)])]
    for ours, pure in zip(parts["numba"], parts["torch"], strict=True):
        for name in ("tokens", "class_tokens", "fires", "act_sum", "hist", "act_max", "top_val", "top_sid"):
            np.testing.assert_array_equal(getattr(ours, name), getattr(pure, name), err_msg=name)
    # the top-list kernels on their own, with many equal activations
    rng = np.random.default_rng(7)
    per_image = (rng.integers(0, 4, (40, 30)) / 2).astype(np.float32)  # [n, b], zeros do not rank
    sample_ids = rng.permutation(30) + 1000
    lists = {}
    for mode in BACKENDS:
        with kernels_backend.forced(mode):
            a = kernels.top_images(per_image, sample_ids, 6)
            b = kernels.top_images(per_image[:, ::-1], sample_ids, 6)  # not C-contiguous
            lists[mode] = (a, kernels.merge_top(a, b))
    for ours, pure in zip(lists["numba"], lists["torch"], strict=True):
        np.testing.assert_array_equal(ours.values, pure.values)
        np.testing.assert_array_equal(ours.sample_ids, pure.sample_ids)
