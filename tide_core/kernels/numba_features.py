"""The feature statistics pass's compiled loops (numba): count firing activations, select and count a
TopK SAE's latents in one sweep, build the encoder input, rank each latent's images, merge top lists.

Reached through ``tide_core.kernels``, which picks these or the pure ones in ``reference.py`` (same
numbers). Each counting loop adds a token's activations in token order, so the float64 sums are the
same whichever path counted them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tide_core.kernels.hist import BIN_EDGE, BIN_FIRST, BIN_KEY0
from tide_core.kernels.numba_topk import next_guess, row_topk, scratch_len, update_estimate
from tide_core.kernels.records import EMPTY, FeatureCounts, TopLists, workspace


@njit(nogil=True, cache=True, boundscheck=False)
def _merge_sorted(a_val, a_sid, b_val, b_sid, out_val, out_sid):  # pragma: no cover - compiled
    """Per row, the first N of two descending lists [F, N] merged (ties: a's first), into out [F, N]."""
    for f in range(a_val.shape[0]):
        i = j = 0
        for o in range(out_val.shape[1]):
            if j >= b_val.shape[1] or (i < a_val.shape[1] and a_val[f, i] >= b_val[f, j]):
                out_val[f, o], out_sid[f, o] = a_val[f, i], a_sid[f, i]
                i += 1
            else:
                out_val[f, o], out_sid[f, o] = b_val[f, j], b_sid[f, j]
                j += 1


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _hist_bin(v, key0, first, edge_in):  # pragma: no cover - compiled
    """Histogram bin of a float32 v > 0 (see hist._bin_table)."""
    i = (np.int32(np.float32(v).view(np.int32)) >> 16) - key0
    if i < 0:
        return 0
    if i >= first.shape[0]:  # >= the last edge: the last bin, which is also the last slice's
        return first[first.shape[0] - 1]
    return first[i] + (np.float64(v) >= edge_in[i])


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _add(sample, latent, v, c, key0, first, edge_in, fires, act_sum, hist, per_image):  # pragma: no cover
    """Count one firing activation v > 0 of latent on a token of image ``sample`` (class c)."""
    fires[c, latent] += 1
    act_sum[c, latent] += v
    hist[latent, _hist_bin(v, key0, first, edge_in)] += 1
    per_image[latent, sample] = max(per_image[latent, sample], v)


@njit(nogil=True, cache=True, boundscheck=False)
def _accumulate(rows, latents, values, p, s0, sample_class, key0, first, edge_in, fires, act_sum, hist,
                per_image):  # pragma: no cover - compiled
    """One pass over firing candidates (entries with value <= 0 are skipped) of token rows of images s0..
    (P tokens each): every statistic."""
    for i in range(values.shape[0]):
        v = values[i]
        if v > 0:
            s = s0 + rows[i] // p
            _add(s, latents[i], v, sample_class[s], key0, first, edge_in, fires, act_sum, hist, per_image)


@njit(nogil=True, cache=True, boundscheck=False)
def _topk_accumulate(pre, row0, bias, val, idx, p, s0, sample_class, key0, first, edge_in, fires, act_sum, hist,
                     per_image):  # pragma: no cover - compiled
    """TopK encode and _accumulate in one call: the top k of each token row of pre [T, n] (encoder matmul
    without the bias, added here in place; rows row0.. of a chunk whose first image is s0), then their
    ReLU'd values counted. Scratch val / idx [>= T, k] float32 / int32 gives k. False if a row had a NaN
    (nothing counted: the caller takes the general path)."""
    t, n = pre.shape
    k = val.shape[1]
    cv, ci = np.empty(scratch_len(n), np.float32), np.empty(scratch_len(n), np.int32)
    sv, si = np.empty((2, scratch_len(n)), np.float32), np.empty(scratch_len(n), np.int32)
    est = np.zeros(3)
    for r in range(t):
        kth = row_topk(pre[r], bias, k, next_guess(est), cv, ci, sv, si, val[r], idx[r])
        if kth != kth:
            return False
        update_estimate(est, kth)
    # Counted in a second loop: reading each row's selection right after the compressing stores that
    # wrote it stalled (measured: the fused loop cost ~2x the two loops).
    for r in range(t):
        s = s0 + (row0 + r) // p
        c = sample_class[s]
        for j in range(k):
            if val[r, j] > 0:  # the ReLU: a selected pre-activation <= 0 does not fire
                _add(s, idx[r, j], val[r, j], c, key0, first, edge_in, fires, act_sum, hist, per_image)
    return True


@njit(nogil=True, cache=True, boundscheck=False)
def _encoder_input(x, scale, gain, shift, b_dec, out):  # pragma: no cover - compiled
    """out [T, d] = ((x * scale) * gain + shift) - b_dec in one pass. gain/shift None: no modulation."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[i, j] * scale
            if gain is not None:
                v = v * gain[j] + shift[j]
            out[i, j] = v - b_dec[j]


@njit(nogil=True, cache=True, boundscheck=False)
def _top_images(per_image, sample_ids, top_val, top_sid):  # pragma: no cover - compiled
    """Each latent's best images (one step): of per_image [n, b], the top N (N = top_val.shape[1]) activations > 0
    into top_val / top_sid [n, N] (filled with EMPTY / -1), descending, equal activations lower sample id
    first."""
    n, b = per_image.shape
    keep = min(top_val.shape[1], b)
    cv, ci = np.empty(scratch_len(b), np.float32), np.empty(scratch_len(b), np.int32)
    sv, si = np.empty((2, scratch_len(b)), np.float32), np.empty(scratch_len(b), np.int32)
    val, idx = np.empty(keep, np.float32), np.empty(keep, np.int32)
    for latent in range(n):  # no NaN: maxima of finite values; no guess: latents differ too much
        row_topk(per_image[latent], None, keep, np.float32(-np.inf), cv, ci, sv, si, val, idx)
        filled = 0
        for j in range(keep):  # insertion sort, descending; equal values by sample id
            v, s = val[j], idx[j]
            if v <= 0:
                continue
            at = filled
            while at > 0 and (top_val[latent, at - 1] < v or (top_val[latent, at - 1] == v
                                                               and top_sid[latent, at - 1] > sample_ids[s])):
                top_val[latent, at] = top_val[latent, at - 1]
                top_sid[latent, at] = top_sid[latent, at - 1]
                at -= 1
            top_val[latent, at] = v
            top_sid[latent, at] = sample_ids[s]
            filled += 1


# ---- the operations tide_core.kernels dispatches to (same signatures as reference.py)


def _args(counts: FeatureCounts) -> tuple:
    return BIN_KEY0, BIN_FIRST, BIN_EDGE, counts.fires, counts.act_sum, counts.hist, counts.per_image


def count_fired(counts: FeatureCounts, rows: np.ndarray, latents: np.ndarray, values: np.ndarray,
                tokens_per_image: int, first_image: int, sample_class: np.ndarray) -> None:
    _accumulate(np.ascontiguousarray(rows, np.int64), np.ascontiguousarray(latents, np.int64),
                np.ascontiguousarray(values, np.float32), tokens_per_image, first_image,
                np.ascontiguousarray(sample_class, np.int64), *_args(counts))


def count_topk(counts: FeatureCounts, pre: np.ndarray, first_row: int, bias: np.ndarray, k: int,
               tokens_per_image: int, first_image: int, sample_class: np.ndarray) -> bool:
    val, idx = workspace("topk_val", (len(pre), k)), workspace("topk_idx", (len(pre), k), np.int32)
    return _topk_accumulate(pre, first_row, np.ascontiguousarray(bias, np.float32), val, idx,
                            tokens_per_image, first_image, np.ascontiguousarray(sample_class, np.int64),
                            *_args(counts))


def encoder_input(x: np.ndarray, scale: float, gain: np.ndarray | None, shift: np.ndarray | None,
                  b_dec: np.ndarray, out: np.ndarray) -> None:
    _encoder_input(x, np.float32(scale), gain, shift, b_dec, out)


def top_images(per_image: np.ndarray, sample_ids: np.ndarray, top_n: int) -> TopLists:
    n = per_image.shape[0]
    top = TopLists(np.full((n, top_n), EMPTY, np.float32), np.full((n, top_n), -1, np.int64))
    _top_images(np.ascontiguousarray(per_image, np.float32), np.ascontiguousarray(sample_ids, np.int64),
                top.values, top.sample_ids)
    return top


def merge_top(a: TopLists, b: TopLists) -> TopLists:
    out = TopLists(np.empty_like(a.values), np.empty_like(a.sample_ids))
    _merge_sorted(a.values, a.sample_ids, b.values, b.sample_ids, out.values, out.sample_ids)
    return out


def _warm_up() -> None:
    rng = np.random.default_rng(0)
    counts = FeatureCounts.zeros(2, 8, 3)
    classes = np.array([0, 1, 0])
    count_fired(counts, np.arange(6), rng.integers(0, 8, 6), rng.random(6).astype(np.float32), 2, 0, classes)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    xc = np.empty_like(x)
    vec = np.ones(4, np.float32)
    encoder_input(x, 1.0, None, None, vec, xc)  # the two specialisations: without and with modulation
    encoder_input(x, 1.0, vec, vec, vec, xc)
    pre = rng.normal(size=(6, 8)).astype(np.float32)
    count_topk(counts, pre, 0, np.zeros(8, np.float32), 2, 2, 0, classes)
    top = top_images(counts.per_image, np.arange(3), 2)
    merge_top(top, top)


WARM_UP = {"features": _warm_up}
