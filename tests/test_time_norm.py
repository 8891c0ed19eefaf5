"""bench/time_norm.py's per-step normalisation baseline: the wrapper maps tokens there and back, each by its
own step's statistics, and scores the SAE in the raw space."""

from __future__ import annotations

import torch

from bench.time_norm import StepStats, Unnormalised
from tide_core.sae import SAESpec, SparseAutoencoder


def _stats() -> StepStats:
    gen = torch.Generator().manual_seed(0)
    mean = torch.zeros(11, 8)
    norm = torch.ones(11)
    mean[[3, 7]] = torch.randn(2, 8, generator=gen) * 5  # two captured timesteps, far apart
    norm[[3, 7]] = torch.tensor([0.5, 20.0])
    return StepStats(mean, norm)


def test_normalise_round_trips_by_each_tokens_timestep() -> None:
    stats = _stats()
    t = torch.tensor([3, 7, 7, 3])
    x = torch.randn(4, 8) * 10  # [B, d]
    xn = stats.normalise(x, t)
    torch.testing.assert_close(xn[1], (x[1] - stats.mean[7]) / 20.0)
    torch.testing.assert_close(stats.unnormalise(xn, t), x)


def test_wrapper_reconstructs_in_the_raw_space() -> None:
    stats = _stats()
    t = torch.tensor([3, 7] * 8)
    x = stats.unnormalise(torch.randn(16, 8), t)  # raw tokens whose normalised form is unit-scale
    sae = SparseAutoencoder(SAESpec(d_in=8, n_latents=16, k=2, variant="topk"), seed=0)
    sae.init_from_sample(stats.normalise(x, t))
    out = Unnormalised(sae, stats)(x, t)
    torch.testing.assert_close(out.x_hat, stats.unnormalise(sae(stats.normalise(x, t)).x_hat, t))
    assert out.x_hat.shape == x.shape and out.idx.shape == (16, 2)
