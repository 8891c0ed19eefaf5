"""Feature statistics of one SAE as a map-reduce over chunks of stored activations.

A chunk is one diffusion step of a block of samples (one Zarr chunk). ``step_partial`` encodes some
chunks of one step and returns a ``StepPartial``: fire counts and activation sums by class, maxima, a
histogram and the top images per latent (``chunk_partial``: one chunk). Partials of the same step merge
exactly (sums, maxima, a top-N merge), so any scheduler may reduce them in any order and get the same
numbers. ``summarise`` stacks the merged steps
into a ``FeatureSummary`` whose properties give per-step, per-class and overall statistics.

Vocabulary: a latent's *activation* on a token is its SAE latent value (scaled SAE units; for TopK SAEs
zero unless it is among the token's top k). It *fires* on a token when that value is > 0. An image's
activation for a latent at a step is the maximum over the image's tokens; top images rank by it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

from tide_core.topk import next_guess, row_topk, scratch_len, update_estimate

# Activation histograms use one fixed log-spaced binning (mergeable across chunks without a first pass
# for each latent's range): 10 bins per decade over [1e-3, 1e3); values outside land in the end bins.
HIST_LOG_LO, HIST_LOG_HI, HIST_PER_DECADE = -3, 3, 10
HIST_EDGES = np.logspace(HIST_LOG_LO, HIST_LOG_HI, (HIST_LOG_HI - HIST_LOG_LO) * HIST_PER_DECADE + 1)
EMPTY = -np.inf  # top-list slots not filled yet


@dataclass
class StepPartial:
    """Statistics of one SAE over some of the tokens of one diffusion step (mergeable)."""

    step: int
    tokens: int
    class_tokens: np.ndarray  # int64 [C] tokens seen per class
    fires: np.ndarray  # int64 [C, n] tokens where the latent fired, by class
    act_sum: np.ndarray  # float64 [C, n] sum of activations where it fired, by class
    act_max: np.ndarray  # float32 [n]
    hist: np.ndarray  # int64 [n, B] counts of firing activations per HIST_EDGES bin
    top_val: np.ndarray  # float32 [n, N] image activations, descending (EMPTY = unfilled)
    top_sid: np.ndarray  # int64 [n, N] their sample ids

    def merge(self, other: StepPartial) -> StepPartial:
        if other.step != self.step:
            raise ValueError(f"cannot merge statistics of step {other.step} into step {self.step}")
        val, sid = merge_top(self.top_val, self.top_sid, other.top_val, other.top_sid)
        return StepPartial(
            step=self.step, tokens=self.tokens + other.tokens, class_tokens=self.class_tokens + other.class_tokens,
            fires=self.fires + other.fires, act_sum=self.act_sum + other.act_sum,
            act_max=np.maximum(self.act_max, other.act_max), hist=self.hist + other.hist, top_val=val, top_sid=sid)


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


def merge_top(a_val: np.ndarray, a_sid: np.ndarray, b_val: np.ndarray, b_sid: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """The N largest of two descending top lists [F, N] and their sample ids, descending (ties: a's first,
    what a stable sort of the two side by side gives)."""
    out_val, out_sid = np.empty_like(a_val), np.empty_like(a_sid)
    _merge_sorted(a_val, a_sid, b_val, b_sid, out_val, out_sid)
    return out_val, out_sid


@dataclass(frozen=True)
class Fired:
    """Candidate (token, latent) pairs of a batch; the latent fired where the value is > 0."""

    rows: torch.Tensor  # [m] long token row in the batch
    latents: torch.Tensor  # [m] long
    values: torch.Tensor  # [m] float, > 0 where fired (TopK selections may hold ReLU'd zeros)


@torch.no_grad()
def fired_latents(sae, x: torch.Tensor, timestep: int | None) -> Fired:
    """Encode tokens x [T, d] at one diffusion timestep: every pair that may fire (value > 0 if it does)."""
    t = torch.full((x.shape[0],), int(timestep), dtype=torch.long) if sae.spec.variant == "tide" else None
    if sae.spec.is_topk:
        lat = sae.encode_sparse(x, t)  # idx, val [T, k]
        rows = torch.arange(x.shape[0]).repeat_interleave(lat.idx.shape[1])  # [T*k]
        return Fired(rows, lat.idx.reshape(-1), lat.val.reshape(-1))
    z = sae.encode(x, t)  # [T, n]
    rows, latents = z.nonzero(as_tuple=True)
    return Fired(rows, latents, z[rows, latents])


def _bin_table(edges: np.ndarray = HIST_EDGES) -> tuple[int, np.ndarray, np.ndarray]:
    """A lookup for the histogram bin of a positive float32 v, exact against ``edges`` (bin b holds
    [edges[b], edges[b+1]); values outside go to the end bins) without a log: v's top 16 bits (exponent
    and 7 mantissa bits) index a slice 2^-7 wide in relative terms, which holds at most one edge (bins are
    10^0.1 wide), so bin = first[slice] + (v >= edge_in[slice]). Returns (first slice key, first, edge_in)."""
    as_key = lambda x: int(np.float32(x).view(np.int32)) >> 16  # noqa: E731
    lo, hi = as_key(edges[0]), as_key(edges[-1])
    keys = np.arange(lo, hi + 1)
    start = (keys << 16).astype(np.int32).view(np.float32).astype(np.float64)  # smallest value of each slice
    stop = ((keys + 1) << 16).astype(np.int32).view(np.float32).astype(np.float64)
    last = len(edges) - 2
    first = np.clip(np.searchsorted(edges, start, side="right") - 1, 0, last)
    nxt = edges[np.minimum(first + 1, len(edges) - 1)]
    edge_in = np.where((nxt < stop) & (first < last), nxt, np.inf)
    return lo, first.astype(np.int64), edge_in


BIN_KEY0, BIN_FIRST, BIN_EDGE = _bin_table()


@njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _hist_bin(v, key0, first, edge_in):  # pragma: no cover - compiled
    """Histogram bin of a float32 v > 0 (see _bin_table)."""
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


@dataclass(frozen=True)
class _Counts:
    """The counters of one step over some images (one or more chunks), filled in place by the kernels."""

    fires: np.ndarray  # int64 [C, n]
    act_sum: np.ndarray  # float64 [C, n]
    hist: np.ndarray  # int64 [n, B]
    per_image: np.ndarray  # float32 [n, b] image activation = max over the image's tokens (its max over
    # images is the latent's max activation, so that needs no counter of its own)

    @classmethod
    def zeros(cls, n_classes: int, n: int, images: int) -> _Counts:
        return cls(np.zeros((n_classes, n), np.int64), np.zeros((n_classes, n), np.float64),
                   np.zeros((n, len(HIST_EDGES) - 1), np.int64), np.zeros((n, images), np.float32))

    def args(self) -> tuple:
        return BIN_KEY0, BIN_FIRST, BIN_EDGE, self.fires, self.act_sum, self.hist, self.per_image


# The matmul and the sweep go tile by tile, a tile's pre-activations at most this many floats (16 MB): a
# whole chunk in one tile for the default SAE (fewer Python-level calls, which hold the GIL the other
# dask threads wait for), bounded memory for wide ones (a chunk of a 16k-latent SAE would be 256 MB).
_TILE_FLOATS = 1 << 22


@njit(nogil=True, cache=True, boundscheck=False)
def _encoder_input(x, scale, gain, shift, b_dec, out):  # pragma: no cover - compiled
    """out [T, d] = ((x * scale) * gain + shift) - b_dec: SparseAutoencoder.encoder_input at one timestep,
    the same float32 operations in the same order (so the same bits) in one pass. gain/shift None: no
    modulation."""
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            v = x[i, j] * scale
            if gain is not None:
                v = v * gain[j] + shift[j]
            out[i, j] = v - b_dec[j]


_WORK = threading.local()


def _workspace(name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A scratch array kept per thread: fresh multi-MB arrays cost page faults on every chunk (measured:
    ~0.4 ms of a ~10 ms chunk)."""
    buf = getattr(_WORK, name, None)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = np.empty(shape, dtype)
        setattr(_WORK, name, buf)
    return buf


@dataclass(frozen=True)
class _Encoder:
    """A TopK SAE's encoder at one timestep, in the pieces the compiled sweep takes (made once per task)."""

    w: torch.Tensor  # [d, n] W_enc^T (a view)
    bias: np.ndarray  # [n] b_enc
    b_dec: np.ndarray  # [d]
    scale: np.float32  # input_scale
    gain: np.ndarray | None  # [d] TIDE's modulation at the timestep (None: no modulation)
    shift: np.ndarray | None  # [d]
    k: int


@torch.no_grad()
def _fast_encoder(sae, timestep: int) -> _Encoder | None:
    """The fast path's encoder, or None where it does not apply (not TopK, not float32 on the CPU)."""
    if not (sae.spec.is_topk and sae.W_enc.device.type == "cpu" and sae.W_enc.dtype == torch.float32):
        return None
    mod = sae.timestep_modulation(timestep)
    gain, shift = (None, None) if mod is None else (mod.gain.numpy(), mod.shift.numpy())
    return _Encoder(w=sae.W_enc.detach().t(), bias=sae.b_enc.detach().numpy(), b_dec=sae.b_dec.detach().numpy(),
                    scale=np.float32(sae.input_scale), gain=gain, shift=shift, k=sae.spec.k)


@torch.no_grad()
def _count_topk(enc: _Encoder, acts: np.ndarray, p: int, s0: int, sample_class: np.ndarray,
                counts: _Counts) -> int:
    """The fast path for TopK SAEs on CPU, for the tokens acts [T, d] of images s0..: the encoder matmul,
    then one compiled sweep that selects and counts (no [T, n] bias pass, no pair arrays). The same
    numbers as fired_latents: the same matmul, the same IEEE bias add, the same exact top-k. Returns the
    rows counted: T, or fewer if a tile had a NaN (the rows before it)."""
    t, d = acts.shape
    n = enc.w.shape[1]
    x = _workspace("x", (t, d))
    torch.from_numpy(x).copy_(torch.from_numpy(acts))  # float16 -> float32, vectorised (numpy's is ~6x slower)
    xc = _workspace("xc", (t, d))  # what the encoder reads
    _encoder_input(x, enc.scale, enc.gain, enc.shift, enc.b_dec, xc)
    tile = max(1, min(t, _TILE_FLOATS // n))
    pre = torch.from_numpy(_workspace("pre", (tile, n)))  # [tile, n]: in cache from matmul to sweep
    val, idx = _workspace("val", (tile, enc.k)), _workspace("idx", (tile, enc.k), np.int32)
    xc = torch.from_numpy(xc)
    for r0 in range(0, t, tile):
        out = pre[:t - r0]
        torch.mm(xc[r0:r0 + tile], enc.w, out=out)  # bias not yet added
        if not _topk_accumulate(out.numpy(), r0, enc.bias, val, idx, p, s0, sample_class, *counts.args()):
            return r0
    return t


@njit(nogil=True, cache=True, boundscheck=False)
def _top_images(per_image, sample_ids, top_val, top_sid):  # pragma: no cover - compiled
    """Each latent's best images (one step): of per_image [n, b], the top N (N = top_val.shape[1]) activations > 0
    into top_val / top_sid [n, N] (filled with EMPTY / -1), descending, equal activations earlier image
    first."""
    n, b = per_image.shape
    keep = min(top_val.shape[1], b)
    cv, ci = np.empty(scratch_len(b), np.float32), np.empty(scratch_len(b), np.int32)
    sv, si = np.empty((2, scratch_len(b)), np.float32), np.empty(scratch_len(b), np.int32)
    val, idx = np.empty(keep, np.float32), np.empty(keep, np.int32)
    for latent in range(n):  # no NaN: maxima of finite values; no guess: latents differ too much
        row_topk(per_image[latent], None, keep, np.float32(-np.inf), cv, ci, sv, si, val, idx)
        filled = 0
        for j in range(keep):  # insertion sort, descending; ties stay in position order (row_topk's output)
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


@dataclass(frozen=True)
class Chunk:
    """The stored activations of some images at one step (a Zarr chunk)."""

    acts: np.ndarray  # [b, P, d] float16 or float32
    sample_ids: np.ndarray  # int64 [b]
    class_ids: np.ndarray  # int64 [b]


def step_partial(sae, chunks: Iterable[Chunk], n_images: int, step: int, timestep: int, n_classes: int,
                 top_n: int) -> StepPartial:
    """Statistics of some chunks of one step, n_images images in all, counted into one set of arrays (no
    per-chunk partials to merge); chunks may be a generator, so only one is in memory at a time."""
    n = sae.spec.n_latents
    counts = _Counts.zeros(n_classes, n, n_images)
    sample_ids = np.full(n_images, -1, np.int64)
    sample_class = np.zeros(n_images, np.int64)
    class_tokens = np.zeros(n_classes, np.int64)
    enc = _fast_encoder(sae, timestep)
    s0 = tokens = 0
    for chunk in chunks:
        b, p, d = chunk.acts.shape
        if s0 + b > n_images:
            raise ValueError(f"step_partial was told of {n_images} images but got more")
        sample_ids[s0:s0 + b], sample_class[s0:s0 + b] = chunk.sample_ids, chunk.class_ids
        acts = chunk.acts.reshape(b * p, d)
        done = _count_topk(enc, acts, p, s0, sample_class, counts) if enc is not None else 0
        if done < b * p:  # relu SAEs, rows with a NaN: the general path for the rest of the chunk
            x = torch.from_numpy(np.ascontiguousarray(acts[done:])).float()  # [rows, d]
            f = fired_latents(sae, x, timestep)
            _accumulate(f.rows.numpy() + done, f.latents.numpy(), f.values.numpy(), p, s0, sample_class,
                        *counts.args())
        class_tokens += np.bincount(chunk.class_ids, minlength=n_classes) * p
        s0, tokens = s0 + b, tokens + b * p
    if s0 != n_images:
        raise ValueError(f"step_partial was told of {n_images} images but got {s0}")
    top_val = np.full((n, top_n), EMPTY, np.float32)
    top_sid = np.full((n, top_n), -1, np.int64)
    _top_images(counts.per_image, sample_ids, top_val, top_sid)
    return StepPartial(step=step, tokens=tokens, class_tokens=class_tokens, fires=counts.fires,
                       act_sum=counts.act_sum, act_max=counts.per_image.max(1), hist=counts.hist, top_val=top_val,
                       top_sid=top_sid)


def chunk_partial(sae, acts: np.ndarray, step: int, timestep: int, sample_ids: np.ndarray,
                  class_ids: np.ndarray, n_classes: int, top_n: int) -> StepPartial:
    """Statistics of one chunk: acts [b, P, d] of samples sample_ids [b] (classes class_ids [b]) at one step."""
    chunk = Chunk(acts, np.asarray(sample_ids, np.int64), np.asarray(class_ids, np.int64))
    return step_partial(sae, [chunk], len(chunk.sample_ids), step, timestep, n_classes, top_n)


def tree_reduce(items: list, combine):
    """combine(a, b) over items as a balanced binary tree (what a scheduler runs in parallel)."""
    while len(items) > 1:
        items = [combine(items[i], items[i + 1]) if i + 1 < len(items) else items[i]
                 for i in range(0, len(items), 2)]
    return items[0]


def merge_all(parts: list[StepPartial]) -> StepPartial:
    """Merge partials of one step pairwise."""
    return tree_reduce(parts, StepPartial.merge)


def selectivity(rates: np.ndarray) -> np.ndarray:
    """Class selectivity of each latent from per-class fire rates [C, n]: 0 = fires equally on every
    class, 1 = fires on one class only; NaN for a latent that never fires.

    Rates (not counts) so unequal class sizes do not bias it; (max share - 1/C) / (1 - 1/C) so it spans
    [0, 1] whatever the number of classes.
    """
    c = rates.shape[0]
    total = rates.sum(0)  # [n]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = rates.max(0) / total
        return np.where(total > 0, (share - 1.0 / c) / (1.0 - 1.0 / c), np.nan)


@dataclass(frozen=True)
class TopImages:
    """Top images of every latent for one scope."""

    value: np.ndarray  # float32 [n, N] image activation, descending; EMPTY where fewer images fired
    sample_id: np.ndarray  # int64 [n, N]
    step: np.ndarray  # int64 [n, N] diffusion step of that activation


@dataclass(frozen=True)
class FeatureSummary:
    """Every statistic of one SAE, per step (axis S, in schedule order of ``steps``) and overall."""

    steps: np.ndarray  # int64 [S]
    tokens: np.ndarray  # int64 [S]
    class_tokens: np.ndarray  # int64 [S, C]
    fires: np.ndarray  # int64 [S, C, n]
    act_sum: np.ndarray  # float64 [S, C, n]
    act_max: np.ndarray  # float32 [S, n]
    hist: np.ndarray  # int64 [n, B]
    top_val: np.ndarray  # float32 [S, n, N]
    top_sid: np.ndarray  # int64 [S, n, N]

    @property
    def n_latents(self) -> int:
        return self.act_max.shape[1]

    # ---- per step
    def step_fire_rate(self) -> np.ndarray:
        return self.fires.sum(1) / self.tokens[:, None]  # [S, n]

    def step_mean_act(self) -> np.ndarray:
        return _mean(self.act_sum.sum(1), self.fires.sum(1))  # [S, n]

    def step_class_rates(self) -> np.ndarray:
        return self.fires / np.maximum(self.class_tokens, 1)[:, :, None]  # [S, C, n]

    def step_top_class(self) -> np.ndarray:
        return self.step_class_rates().argmax(1)  # [S, n]

    def step_selectivity(self) -> np.ndarray:
        return np.stack([selectivity(r) for r in self.step_class_rates()])  # [S, n]

    # ---- overall
    def fire_rate(self) -> np.ndarray:
        return self.fires.sum((0, 1)) / self.tokens.sum()  # [n]

    def mean_act(self) -> np.ndarray:
        return _mean(self.act_sum.sum((0, 1)), self.fires.sum((0, 1)))  # [n]

    def max_act(self) -> np.ndarray:
        return self.act_max.max(0)  # [n]

    def peak_step(self) -> np.ndarray:
        return self.steps[self.step_fire_rate().argmax(0)]  # [n] (meaningless where never fired)

    def class_rates(self) -> np.ndarray:
        return self.fires.sum(0) / np.maximum(self.class_tokens.sum(0), 1)[:, None]  # [C, n]

    def class_mean_act(self) -> np.ndarray:
        return _mean(self.act_sum.sum(0), self.fires.sum(0))  # [C, n]

    def quantiles(self, qs: np.ndarray) -> np.ndarray:
        """Approximate activation quantiles [n, len(qs)] from the histogram (geometric interpolation in
        the bin; NaN for latents that never fire)."""
        cum = np.cumsum(self.hist, 1)  # [n, B]
        total = cum[:, -1:]
        out = np.full((self.n_latents, len(qs)), np.nan)
        lo, hi = np.log(HIST_EDGES[:-1]), np.log(HIST_EDGES[1:])
        for j, q in enumerate(qs):
            target = q * total[:, 0]
            b = np.minimum((cum < target[:, None]).sum(1), self.hist.shape[1] - 1)  # [n] bin of the quantile
            below = np.where(b > 0, cum[np.arange(len(b)), b - 1], 0)
            frac = np.clip((target - below) / np.maximum(self.hist[np.arange(len(b)), b], 1), 0, 1)
            out[:, j] = np.where(total[:, 0] > 0, np.exp(lo[b] + frac * (hi[b] - lo[b])), np.nan)
        return out

    # ---- top images
    def top_at_peak(self) -> TopImages:
        axis = self.step_fire_rate().argmax(0)  # [n]
        rows = np.arange(self.n_latents)
        val, sid = self.top_val[axis, rows], self.top_sid[axis, rows]  # [n, N]
        return TopImages(val, sid, np.broadcast_to(self.steps[axis][:, None], val.shape).copy())

    def top_overall(self) -> TopImages:
        """Top images over all steps, one entry per image (its best step). Exact: an image in the overall
        top N is in the top N of the step where it peaks, so the per-step lists hold every candidate."""
        s, n, top_n = self.top_val.shape
        val = self.top_val.transpose(1, 0, 2).reshape(n, s * top_n)  # [n, S*N]
        sid = self.top_sid.transpose(1, 0, 2).reshape(n, s * top_n)
        step = np.repeat(self.steps, top_n)[None].repeat(n, 0)  # [n, S*N]
        order = np.argsort(-val, axis=1, kind="stable")
        val, sid, step = (np.take_along_axis(a, order, 1) for a in (val, sid, step))
        out_v = np.full((n, top_n), EMPTY, np.float32)
        out_s = np.full((n, top_n), -1, np.int64)
        out_t = np.full((n, top_n), -1, np.int64)
        for f in range(n):
            live = val[f] > EMPTY
            _, first = np.unique(sid[f][live], return_index=True)  # each image at its best step
            pick = np.sort(first)[:top_n]
            out_v[f, :len(pick)], out_s[f, :len(pick)] = val[f][live][pick], sid[f][live][pick]
            out_t[f, :len(pick)] = step[f][live][pick]
        return TopImages(out_v, out_s, out_t)


def summarise(parts: list[StepPartial]) -> FeatureSummary:
    """Stack merged per-step partials (one per step, any order) into a FeatureSummary."""
    parts = sorted(parts, key=lambda p: p.step)
    steps = [p.step for p in parts]
    if len(set(steps)) != len(steps):
        raise ValueError(f"summarise needs one merged partial per step; got steps {steps}")
    return FeatureSummary(
        steps=np.array(steps, np.int64), tokens=np.array([p.tokens for p in parts], np.int64),
        class_tokens=np.stack([p.class_tokens for p in parts]), fires=np.stack([p.fires for p in parts]),
        act_sum=np.stack([p.act_sum for p in parts]), act_max=np.stack([p.act_max for p in parts]),
        hist=np.sum([p.hist for p in parts], 0), top_val=np.stack([p.top_val for p in parts]),
        top_sid=np.stack([p.top_sid for p in parts]))


def _mean(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclass(frozen=True)
class Neighbors:
    """Nearest latents by decoder direction."""

    ids: np.ndarray  # int64 [n, K]
    cosine: np.ndarray  # float32 [n, K], descending


@torch.no_grad()
def decoder_neighbors(w_dec: torch.Tensor, k: int, block: int = 4096) -> Neighbors:
    """The k latents whose decoder rows (w_dec [n, d]) point most nearly the same way as each latent's.
    Row blocks keep memory at block x n, so 16k+ latents fit."""
    w = torch.nn.functional.normalize(w_dec.float(), dim=1)  # [n, d]
    n = w.shape[0]
    k = min(k, n - 1)
    ids, cos = [], []
    for start in range(0, n, block):
        sim = w[start:start + block] @ w.T  # [b, n]
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -float("inf")  # not its own neighbour
        top = sim.topk(k, dim=1)
        ids.append(top.indices)
        cos.append(top.values)
    return Neighbors(torch.cat(ids).numpy().astype(np.int64), torch.cat(cos).numpy())


@torch.no_grad()
def heatmaps(sae, acts: np.ndarray, timestep: int, rows: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """Activation of latents[i] over every token of image rows[i]: acts [m, T, d] (the full token grid of
    m images at one step) -> [len(rows), T]. Sparse throughout, so wide SAEs cost no dense [m, T, n]."""
    m, t, d = acts.shape
    n = sae.spec.n_latents
    x = torch.from_numpy(np.ascontiguousarray(acts, dtype=np.float32)).view(m * t, d)  # [m*T, d]
    f = fired_latents(sae, x, timestep)
    fired_code = (f.rows // t).numpy() * n + f.latents.numpy()  # [pairs] (image, latent)
    codes, inverse = np.unique(np.asarray(rows, np.int64) * n + np.asarray(latents, np.int64), return_inverse=True)
    pos = np.clip(np.searchsorted(codes, fired_code), 0, len(codes) - 1)
    hit = codes[pos] == fired_code  # pairs some request asked for
    grid = np.zeros((len(codes), t), np.float32)  # [U, T]
    grid[pos[hit], (f.rows % t).numpy()[hit]] = f.values.numpy()[hit]
    return grid[inverse]  # [R, T]
