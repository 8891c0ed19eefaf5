"""Evaluation of a trained SAE, per sampling step and overall, from a stream of token batches.

Every metric is accumulated as exact sums (float64) over tokens, never as an average of batch averages,
so the result does not depend on how the stream is batched. Reconstruction metrics are in the original
activation scale.

* mse: sum of squared errors / (tokens * d_in).
* nmse: sum of squared errors / sum of squared deviations of x from its per-channel mean over the same
  tokens (0 = perfect, 1 = no better than predicting the mean); explained_variance = 1 - nmse.
* cosine: mean over tokens of cos(x, x_hat).
* l0: mean number of active latents per token.
* dead_fraction: latents that never fired on the evaluated tokens (of that step, or overall).
* dense_fraction: latents firing on more than DENSE_THRESHOLD (10%) of the tokens: with k ~ 32 of
  thousands of latents a healthy feature fires far more rarely; dense ones are usually bias-like.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tide_core.sae.batches import TokenBatch
from tide_core.sae.model import SparseAutoencoder

DENSE_THRESHOLD = 0.1


@dataclass(frozen=True)
class StepMetrics:
    """Metrics of an SAE over a set of tokens (one sampling step, or all)."""

    tokens: int
    mse: float
    nmse: float
    explained_variance: float
    cosine: float
    l0: float
    dead_fraction: float
    dense_fraction: float


@dataclass
class _Sums:
    """Exact running sums for one group of tokens."""

    d_in: int
    n_latents: int
    tokens: int = 0
    sse: float = 0.0
    cos: float = 0.0
    active: int = 0
    sum_x: np.ndarray = field(init=False)  # [d_in] float64
    sum_x2: np.ndarray = field(init=False)  # [d_in] float64
    fires: np.ndarray = field(init=False)  # [n_latents] int64: tokens on which each latent fired

    def __post_init__(self) -> None:
        self.sum_x = np.zeros(self.d_in)
        self.sum_x2 = np.zeros(self.d_in)
        self.fires = np.zeros(self.n_latents, dtype=np.int64)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, l0: torch.Tensor, fires: torch.Tensor) -> None:
        x64, x_hat64 = x.double(), x_hat.double()  # [b, d]
        self.tokens += len(x)
        self.sse += float((x64 - x_hat64).pow(2).sum())
        self.cos += float(F.cosine_similarity(x64, x_hat64, dim=1).sum())
        self.active += int(l0.sum())
        self.sum_x += x64.sum(0).cpu().numpy()
        self.sum_x2 += x64.pow(2).sum(0).cpu().numpy()
        self.fires += fires.cpu().numpy()

    def merge(self, other: _Sums) -> None:
        self.tokens += other.tokens
        self.sse += other.sse
        self.cos += other.cos
        self.active += other.active
        self.sum_x += other.sum_x
        self.sum_x2 += other.sum_x2
        self.fires += other.fires

    def result(self) -> StepMetrics:
        n = max(self.tokens, 1)
        # Sum of squared deviations from the per-channel mean: sum x^2 - n * mean^2, per channel.
        ss_dev = float((self.sum_x2 - self.sum_x**2 / n).sum())
        nmse = self.sse / ss_dev if ss_dev > 0 else float("nan")
        return StepMetrics(
            tokens=self.tokens,
            mse=self.sse / (n * self.d_in),
            nmse=nmse,
            explained_variance=1.0 - nmse,
            cosine=self.cos / n,
            l0=self.active / n,
            dead_fraction=float((self.fires == 0).mean()),
            dense_fraction=float((self.fires > DENSE_THRESHOLD * self.tokens).mean()),
        )


@dataclass(frozen=True)
class EvalResult:
    """Metrics per sampling step (key: step index, 0 = noisiest) and over all evaluated tokens."""

    per_step: dict[int, StepMetrics]
    overall: StepMetrics
    fire_counts: np.ndarray  # [n_latents] int64: tokens on which each latent fired, overall


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, batches: Iterable[TokenBatch], max_tokens: int | None = None) -> EvalResult:
    """Evaluate ``sae`` on every token of ``batches`` (or the first ``max_tokens``)."""
    spec = sae.spec
    groups: dict[int, _Sums] = {}
    device = sae.W_dec.device
    seen = 0
    was_training = sae.training
    sae.eval()
    try:
        for raw in map(TokenBatch.coerce, batches):
            if max_tokens is not None and seen >= max_tokens:
                break
            if max_tokens is not None and len(raw) > max_tokens - seen:
                raw = raw.slice(0, max_tokens - seen)
            batch = raw.to_torch(device)
            seen += len(batch)
            out = sae(batch.acts, batch.timesteps)
            dense = out.dense_latents()  # [B, n]
            l0 = (dense > 0).sum(1)  # [B]
            for step in torch.unique(batch.steps).tolist():
                m = batch.steps == step  # [B] bool
                group = groups.setdefault(int(step), _Sums(spec.d_in, spec.n_latents))
                group.add(batch.acts[m], out.x_hat[m], l0[m], (dense[m] > 0).sum(0))
    finally:
        sae.train(was_training)
    if not groups:
        raise ValueError("evaluate() got no tokens: the batch stream is empty")
    total = _Sums(spec.d_in, spec.n_latents)
    for group in groups.values():
        total.merge(group)
    return EvalResult(
        per_step={s: groups[s].result() for s in sorted(groups)},
        overall=total.result(),
        fire_counts=total.fires,
    )
