"""The reduce step's result: every statistic of one SAE per diffusion step and overall.

``summarise`` stacks the merged per-step partials into a ``FeatureSummary``, whose methods give per-step,
per-class and overall statistics and the top images (at each latent's peak step, and overall).

Vocabulary: a latent's *activation* on a token is its SAE latent value (scaled SAE units; for TopK SAEs
zero unless it is among the token's top k). It *fires* on a token when that value is > 0. An image's
activation for a latent at a step is the maximum over the image's tokens; top images rank by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tide_core.features.partials import StepPartial
from tide_core.kernels import EMPTY, HIST_EDGES


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
