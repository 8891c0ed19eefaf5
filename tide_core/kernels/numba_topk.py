"""Exact row-wise top-k on the CPU, compiled with numba: the hot loop of TopK SAE training and of the
feature statistics pass. Reached through ``tide_core.kernels.topk``, which picks this or the pure path.

Picking 32 of 1024 per row costs ~4.5 µs with torch.topk on the CPU, ~3 µs with two stages of numpy's
argpartition, and ~0.5 µs with this kernel (AVX-512), which per row does:

1. Maxima of 32 interleaved groups (group g holds entries g, g + 32, g + 64, ...): two 16-lane vector
   maxima per 32 entries. Their minimum ``thr`` is a lower bound for the k-th largest entry when k <= 32:
   each group holds an entry >= thr, so at least 32 entries are >= thr. (For k > 32, thr = -inf.)
2. Compress the entries >= thr with their positions (about 12% of a row of Gaussian-like
   pre-activations, measured on the default SAEs too) into a scratch buffer: ``vcompressps``.
3. Quickselect the k-th largest value T of (a copy of) those candidates: count the candidates above a
   median-of-three pivot (vectorised) and compress the side that holds the k-th into a ping-pong buffer.
4. Compress the candidates > T, then as many == T as the k still needs, lowest position first.

Steps 1, 2 and the compresses are LLVM vector IR (``tide_core.kernels.simd``). The result is the exact
top-k set by value; equal values go to the lower position, so ties are deterministic. A row with a NaN
has no well-defined top-k by comparison: the kernel reports such rows and the caller falls back to
torch.topk for that batch, which treats NaN as the largest value.

``row_topk`` is one row, for other kernels to call (the feature pass adds the encoder bias in the same
sweep). ``topk_rows`` splits a batch's rows over ``threads`` of numba's threads (the entry point passes
torch's intra-op thread count: 1 inside the feature pass, whose dask threads already fill the cores).
The first call compiles the kernels (a few seconds) and numba caches them next to this file.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from tide_core.kernels.records import LatentPairs, TopKSelection
from tide_core.kernels.simd import (
    GROUPS,
    LANES,
    add_compress_ge,
    count_eq,
    count_gt,
    pad_compress_eq,
    pad_compress_ge,
    pad_compress_gt,
    pad_compress_lt,
    row_threshold32,
)


@njit(nogil=True, cache=True, boundscheck=False, fastmath={"nnan", "nsz", "reassoc"})
def _max(val, m):  # pragma: no cover - compiled
    """max of val[:m], no NaN (so LLVM may vectorise the reduction; infinities are fine)."""
    t = val[0]
    for i in range(1, m):
        t = max(t, val[i])
    return t


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _kth_largest(val, m, k, scratch):  # pragma: no cover - compiled
    """The k-th largest of val[:m] (1 <= k <= m, no NaN), by a quickselect that packs the side holding it
    into the ping-pong rows of scratch [2, >= m] (val is not changed)."""
    src = val
    flip = 0
    while m > k:
        if k == 1:
            return _max(src, m)
        x, y, z = src[0], src[m >> 1], src[m - 1]
        if 3 * k < m:  # the k-th is near the top: the largest of three samples is a closer pivot
            p = max(x, max(y, z))
        elif 3 * k > 2 * m:  # near the bottom: the smallest
            p = min(x, min(y, z))
        else:
            p = max(min(x, y), min(max(x, y), z))  # median of three
        dst = scratch[flip]
        gt = count_gt(src, m, p)
        if gt >= k:
            m = pad_compress_gt(src, None, m, p, dst, None)
        else:
            eq = count_eq(src, m, p)
            if gt + eq >= k:
                return p
            k -= gt + eq
            m = pad_compress_lt(src, None, m, p, dst, None)
        src = dst
        flip ^= 1
    t = src[0]  # m == k: all of them are in, the k-th is the smallest
    for i in range(1, m):
        t = min(t, src[i])
    return t


@njit(cache=True)
def scratch_len(n):
    """Length of row_topk's float scratch rows for rows of n entries (compresses may write 15 past)."""
    return n + LANES


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def row_topk(row, bias, k, guess, cv, ci, sv, si, out_val, out_idx):  # pragma: no cover - compiled
    """Top-k of one float32 row [n] (plus bias [n], added into row in place; None: none) into out_val [k]
    / out_idx [k] (int32), in no particular order. Returns the k-th largest value, or NaN (outputs
    unfilled) if the row has a NaN. ``guess``: an estimate of the k-th largest from earlier rows
    (``next_guess``; -inf: none). Scratch: cv, ci, si [scratch_len(n)] float32 / int32 / int32, sv [2,
    scratch_len(n)] float32."""
    n = row.shape[0]
    c = -2
    if guess > -np.inf:  # one sweep adds the bias and keeps the entries >= guess, checked below
        c = add_compress_ge(row, bias, guess, cv, ci)
        if c == -1:
            return np.float32(np.nan)
    if c < k:  # no guess, or a guess above the k-th largest (fewer than k kept): the group bound
        if c == -2:  # the bias is still to add
            thr = row_threshold32(row, bias)
        else:
            thr = row_threshold32(row, None)
        if thr != thr:
            return np.float32(np.nan)
        if k > GROUPS:  # the group bound needs k <= GROUPS: every entry is a candidate
            thr = np.float32(-np.inf)
        c = pad_compress_ge(row, None, n, thr, cv, ci)
    # c >= k candidates hold the top k: at least k entries are >= the bound they passed.
    # The quickselect runs on a copy of the candidate values: measured ~12% faster for the whole top-k than
    # on cv itself (likely the many overlapping 16-lane stores that built cv, retired by the time the copy
    # is read; not pinned down).
    pad_compress_ge(cv, None, c, np.float32(-np.inf), sv[1], None)
    t = _kth_largest(sv[1], c, k, sv)
    # Packed into padded scratch, then copied out: a compressing store to memory is slow on some CPUs.
    above = pad_compress_gt(cv, ci, c, t, sv[0], si)  # < k of them, in position order
    if above < k:  # the rest are ties at t: lowest positions first
        pad_compress_eq(cv, ci, c, t, None, si[above:])
    for i in range(above):
        out_val[i] = sv[0, i]
    for i in range(above, k):
        out_val[i] = t
    for i in range(k):
        out_idx[i] = si[i]
    return t


@njit(nogil=True, cache=True, inline="always")
def next_guess(est):  # pragma: no cover - compiled
    """The guess to pass row_topk from a running estimate est = [mean, variance, rows] of the k-th largest
    value: mean - 3 sd, which keeps ~6% of a row of the default SAEs' pre-activations instead of the
    group bound's ~12% (and is wrong, costing a second sweep, for ~0.02% of rows); -inf until 8 rows."""
    if est[2] < 8:
        return np.float32(-np.inf)
    return np.float32(est[0] - 3.0 * np.sqrt(est[1]))


@njit(nogil=True, cache=True, inline="always")
def update_estimate(est, t):  # pragma: no cover - compiled
    """Fold a row's k-th largest value t into est (exponentially weighted, so it follows drift)."""
    if np.isfinite(t):
        d = t - est[0] if est[2] > 0 else 0.0
        est[0] = est[0] + 0.05 * d if est[2] > 0 else t
        est[1] = 0.95 * (est[1] + 0.05 * d * d)
        est[2] += 1


@njit(nogil=True, cache=True, boundscheck=False)
def _topk_block(pre, k, out_val, out_idx, r0, r1):  # pragma: no cover - compiled
    """Top-k of rows r0..r1 of pre [B, n] (float32) into out_val / out_idx [B, k]; returns the number of
    rows that had a NaN (left unfilled)."""
    n = pre.shape[1]
    cv, ci = np.empty(scratch_len(n), np.float32), np.empty(scratch_len(n), np.int32)
    sv, si = np.empty((2, scratch_len(n)), np.float32), np.empty(scratch_len(n), np.int32)
    idx = np.empty((r1 - r0, k), np.int32)
    est = np.zeros(3)
    bad = 0
    for r in range(r0, r1):
        t = row_topk(pre[r], None, k, next_guess(est), cv, ci, sv, si, out_val[r], idx[r - r0])
        bad += t != t
        update_estimate(est, t)
    # widened to the caller's int64 afterwards: read right after the compressing stores wrote them, they
    # stall (see numba_features._topk_accumulate)
    for r in range(r0, r1):
        for j in range(k):
            out_idx[r, j] = idx[r - r0, j]
    return bad


@njit(nogil=True, cache=True, parallel=True)
def _topk_parallel(pre, k, out_val, out_idx, blocks):  # pragma: no cover - compiled
    """_topk_block over ``blocks`` contiguous row ranges on numba's thread pool."""
    b = pre.shape[0]
    bad = 0
    for i in prange(blocks):
        bad += _topk_block(pre, k, out_val, out_idx, i * b // blocks, (i + 1) * b // blocks)
    return bad


_PARALLEL = threading.Lock()
_LAYER_CHOSEN = threading.Event()


def prefer_openmp() -> None:
    """Ask numba for its OpenMP threading layer, once, before its first parallel launch (numba picks the
    layer then, for the whole process), unless the user chose a layer or a priority themselves.

    Why OpenMP first: torch's CPU build runs its ops on libgomp, and numba's "omp" layer then shares that
    runtime's threads. Under TBB (numba's own first choice) the two pools fight for the cores while torch's
    OpenMP workers spin after each op (measured: the parallel top-k then gains nothing).
    """
    if _LAYER_CHOSEN.is_set():
        return
    user_chose = ("NUMBA_THREADING_LAYER" in os.environ or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ
                  or numba.config.THREADING_LAYER != "default")
    if not user_chose:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    _LAYER_CHOSEN.set()


@dataclass(frozen=True)
class RowTopK:
    """The k largest entries of each row (in no particular order), or ``ok=False`` if a row had a NaN."""

    values: np.ndarray  # [B, k] float32
    indices: np.ndarray  # [B, k] int64
    ok: bool


def topk_rows(pre: np.ndarray, k: int, threads: int = 1) -> RowTopK:
    """Exact top-k of each row of a float32 array pre [B, n], 1 <= k <= n, on up to ``threads`` threads
    (numba's own limit, NUMBA_NUM_THREADS, caps it). Equal values are taken lowest position first."""
    b, n = pre.shape
    pre = np.ascontiguousarray(pre, np.float32)
    values = np.empty((b, k), np.float32)
    indices = np.empty((b, k), np.int64)
    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    if threads == 1:
        bad = _topk_block(pre, k, values, indices, 0, b)
    else:
        # One parallel call at a time: numba's fallback "workqueue" layer (where neither OpenMP nor TBB
        # is available) aborts on concurrent use, and a parallel call already fills the cores anyway.
        with _PARALLEL:
            prefer_openmp()
            numba.set_num_threads(threads)
            bad = _topk_parallel(pre, k, values, indices, threads)
    return RowTopK(values, indices, bad == 0)


def topk_cpu(pre: Tensor, k: int, threads: int) -> TopKSelection | None:
    """``tide_core.kernels.topk`` for a float32 CPU tensor pre [B, n] (k < n): None if a row has a NaN."""
    top = topk_rows(pre.detach().contiguous().numpy(), k, threads)
    return TopKSelection(torch.from_numpy(top.values), torch.from_numpy(top.indices)) if top.ok else None


@njit(nogil=True, cache=True, boundscheck=False)
def _group_pairs(idx, n_latents, order, tokens, crow):  # pragma: no cover - compiled
    """Counting sort of the pairs of idx [B, k] by latent (stable): see ``pairs_by_latent``."""
    b, k = idx.shape
    crow[:] = 0
    for t in range(b):
        for j in range(k):
            crow[idx[t, j] + 1] += 1
    for latent in range(n_latents):
        crow[latent + 1] += crow[latent]
    fill = crow[:-1].copy()
    for t in range(b):
        for j in range(k):
            at = fill[idx[t, j]]
            order[at] = t * k + j
            tokens[at] = t
            fill[idx[t, j]] = at + 1


def pairs_by_latent(idx: Tensor, n_latents: int) -> LatentPairs:
    """Group the pairs of idx [B, k] (CPU, latent ids in [0, n_latents)) by latent in O(B*k): a counting
    sort, ~10x faster than torch's stable argsort of the flat ids."""
    b, k = idx.shape
    ids = np.ascontiguousarray(idx.numpy(), np.int64)
    order, tokens = np.empty(b * k, np.int64), np.empty(b * k, np.int64)
    crow = np.empty(n_latents + 1, np.int64)
    _group_pairs(ids, n_latents, order, tokens, crow)
    return LatentPairs(*(torch.from_numpy(a) for a in (order, tokens, crow)))


def _warm_topk() -> None:
    rng = np.random.default_rng(0)
    pre = torch.from_numpy(rng.normal(size=(4, 64)).astype(np.float32))
    topk_cpu(pre, 8, 1)


def _warm_topk_parallel() -> None:
    pre = torch.from_numpy(np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32))
    topk_cpu(pre, 8, 2)


def _warm_pairs() -> None:
    pairs_by_latent(torch.tensor([[0, 3], [2, 0]]), 4)


# Called by tide_core.kernels.backend the first time each group is used: every kernel of the group on
# tiny inputs of the types the callers pass, so a compile error surfaces inside its guard.
WARM_UP = {"topk": _warm_topk, "topk_parallel": _warm_topk_parallel, "pairs": _warm_pairs}
