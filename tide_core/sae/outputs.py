"""What a forward pass and a loss return (records, shapes in comments)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SAEOutput:
    """One forward pass.

    TopK variants fill ``idx``/``val`` (sparse, k per token; batch variants in training m per token, zeros
    where fewer fire), relu and the batch variants at inference fill ``z`` (dense). ``dense_latents()``,
    ``l0()`` and ``fire_counts()`` work for both. Latent values are in the SAE's scaled units.
    """

    x_hat: Tensor  # [B, d_in] reconstruction, in the original activation scale
    n_latents: int
    idx: Tensor | None = None  # [B, k] long
    val: Tensor | None = None  # [B, k] >= 0
    z: Tensor | None = None  # [B, n_latents] >= 0

    def dense_latents(self) -> Tensor:
        if self.z is not None:
            return self.z
        b = self.idx.shape[0]
        return self.val.new_zeros(b, self.n_latents).scatter_(1, self.idx, self.val)  # [B, n]

    def l0(self) -> Tensor:
        """Active latents per token [B]."""
        return ((self.z if self.z is not None else self.val) > 0).sum(1)

    def fire_counts(self) -> Tensor:
        """Tokens of this batch on which each latent fired [n_latents] (int64)."""
        if self.z is not None:
            return (self.z > 0).sum(0)
        fired = self.idx[self.val > 0]  # [n_fired]
        return torch.bincount(fired, minlength=self.n_latents)


@dataclass(frozen=True)
class SAELoss:
    """Loss terms of one batch (scalars); ``total`` is what is differentiated."""

    total: Tensor
    mse: Tensor  # mean squared error per channel, in the scaled space
    aux: Tensor  # AuxK term, already multiplied by aux_coeff (0 for relu or when nothing is dead)
    l1: Tensor  # L1 term, already multiplied by l1_coeff (0 for TopK variants)
    output: SAEOutput
    threshold: Tensor | None = None  # [] batch variants: the batch's selection threshold (no grad)
