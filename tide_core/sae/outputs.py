"""What a forward pass and a loss return (records, shapes in comments)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SAEOutput:
    """One forward pass.

    TopK variants fill ``idx``/``val`` (sparse, k per token; batch variants in training packed rows, with
    ``rows`` naming each row's token), relu and the batch variants at inference fill ``z`` (dense). ``dense_latents()``,
    ``l0()`` and ``fire_counts()`` work for both. Latent values are in the SAE's scaled units.
    """

    x_hat: Tensor  # [B, d_in] reconstruction, in the original activation scale
    n_latents: int
    idx: Tensor | None = None  # [B, k] long
    val: Tensor | None = None  # [B, k] >= 0
    z: Tensor | None = None  # [B, n_latents] >= 0
    rows: Tensor | None = None  # [R] long: the token of each row of idx / val when they are packed rows

    def dense_latents(self) -> Tensor:
        if self.z is not None:
            return self.z
        b = self.x_hat.shape[0]
        if self.rows is None:
            return self.val.new_zeros(b, self.n_latents).scatter_(1, self.idx, self.val)  # [B, n]
        tokens = self.rows[:, None].expand_as(self.idx)  # [R, m]; padding adds 0 to latent 0
        return self.val.new_zeros(b, self.n_latents).index_put_((tokens, self.idx), self.val, accumulate=True)

    def l0(self) -> Tensor:
        """Active latents per token [B]."""
        fired = ((self.z if self.z is not None else self.val) > 0).sum(1)  # [B] or [R]
        if self.rows is None:
            return fired
        return fired.new_zeros(self.x_hat.shape[0]).index_add_(0, self.rows, fired)

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
