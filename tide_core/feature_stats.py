"""Feature statistics of one SAE as a map-reduce over chunks of stored activations.

A chunk is one diffusion step of a block of samples (one Zarr chunk). ``chunk_partial`` encodes it and
returns a ``StepPartial``: fire counts and activation sums by class, maxima, a histogram and the chunk's
top images per latent. Partials of the same step merge exactly (sums, maxima, a top-N merge), so any
scheduler may reduce them in any order and get the same numbers. ``summarise`` stacks the merged steps
into a ``FeatureSummary`` whose properties give per-step, per-class and overall statistics.

Vocabulary: a latent's *activation* on a token is its SAE latent value (scaled SAE units; for TopK SAEs
zero unless it is among the token's top k). It *fires* on a token when that value is > 0. An image's
activation for a latent at a step is the maximum over the image's tokens; top images rank by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

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
        val, sid = merge_top(np.concatenate([self.top_val, other.top_val], 1),
                             np.concatenate([self.top_sid, other.top_sid], 1), self.top_val.shape[1])
        return StepPartial(
            step=self.step, tokens=self.tokens + other.tokens, class_tokens=self.class_tokens + other.class_tokens,
            fires=self.fires + other.fires, act_sum=self.act_sum + other.act_sum,
            act_max=np.maximum(self.act_max, other.act_max), hist=self.hist + other.hist, top_val=val, top_sid=sid)


def merge_top(val: np.ndarray, sid: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n largest of each row of val [F, M] (descending) with their sample ids."""
    order = np.argsort(-val, axis=1, kind="stable")[:, :n]  # [F, n]
    return np.take_along_axis(val, order, 1), np.take_along_axis(sid, order, 1)


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


@njit(nogil=True, cache=True, boundscheck=False)
def _accumulate(rows, latents, values, bins, p, sample_class, fires, act_sum, act_max, hist, per_image):  # pragma: no cover
    """One pass over firing candidates (entries with value <= 0 are skipped): every per-chunk statistic."""
    for i in range(values.shape[0]):
        v = values[i]
        if v > 0:
            latent, sample = latents[i], rows[i] // p
            c = sample_class[sample]
            fires[c, latent] += 1
            act_sum[c, latent] += v
            act_max[latent] = max(act_max[latent], v)
            hist[latent, bins[i]] += 1
            per_image[sample, latent] = max(per_image[sample, latent], v)


def chunk_partial(sae, acts: np.ndarray, step: int, timestep: int, sample_ids: np.ndarray,
                  class_ids: np.ndarray, n_classes: int, top_n: int) -> StepPartial:
    """Statistics of one chunk: acts [b, P, d] of samples sample_ids [b] (classes class_ids [b]) at one step."""
    b, p, d = acts.shape
    n = sae.spec.n_latents
    x = torch.from_numpy(np.ascontiguousarray(acts)).view(b * p, d).float()  # [b*P, d]
    f = fired_latents(sae, x, timestep)
    n_bins = len(HIST_EDGES) - 1
    # log10 of a non-firing zero is -inf, clamped to bin 0; _accumulate skips those pairs
    bins = ((torch.log10(f.values) - HIST_LOG_LO) * HIST_PER_DECADE).floor_().clamp_(0, n_bins - 1).int()
    fires = np.zeros((n_classes, n), np.int64)
    act_sum = np.zeros((n_classes, n), np.float64)
    act_max = np.zeros(n, np.float32)
    hist = np.zeros((n, n_bins), np.int64)
    per_image = np.zeros((b, n), np.float32)  # image activation = max over the image's tokens
    _accumulate(f.rows.numpy(), f.latents.numpy(), f.values.numpy(), bins.numpy(), p,
                np.asarray(class_ids, np.int64), fires, act_sum, act_max, hist, per_image)
    # A chunk contributes its best top_n images per latent.
    keep = min(top_n, b)
    top = torch.from_numpy(per_image).topk(keep, dim=0)  # values, indices [keep, n]
    top_val = np.full((n, top_n), EMPTY, np.float32)
    top_sid = np.full((n, top_n), -1, np.int64)
    top_val[:, :keep] = np.where(top.values.T.numpy() > 0, top.values.T.numpy(), EMPTY)
    top_sid[:, :keep] = np.asarray(sample_ids, np.int64)[top.indices.T.numpy()]
    class_tokens = np.bincount(np.asarray(class_ids, np.int64), minlength=n_classes) * p
    return StepPartial(step=step, tokens=b * p, class_tokens=class_tokens, fires=fires, act_sum=act_sum,
                       act_max=act_max, hist=hist, top_val=top_val, top_sid=top_sid)


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
