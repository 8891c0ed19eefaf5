"""Reference implementations for the benchmarks and the equality tests (never imported by the library).

``DenseTopKReference`` is the plainest correct TopK SAE: dense latents via scatter, a dense decoder matmul,
plain autograd. The sparse SAE of ``tide_core.sae`` must compute the same values and gradients
(tests/test_sae.py), and ``bench/sae_train.py`` times one against the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tide_core.sae import SparseAutoencoder


@dataclass(frozen=True)
class DenseOutput:
    """Forward pass of the dense reference (scaled space)."""

    xs_hat: Tensor  # [B, d_in] reconstruction of the scaled input
    z: Tensor  # [B, n_latents] dense latents
    mse: Tensor  # scalar, same definition as SAELoss.mse


class DenseTopKReference(nn.Module):
    """The plainest correct TopK SAE: dense latents via scatter, dense decoder matmul, plain autograd.

    Same parameters and loss (MSE only) as a ``topk`` SparseAutoencoder; for the speed benchmark and to
    check that the sparse path computes the same values and gradients.
    """

    def __init__(self, d_in: int, n_latents: int, k: int):
        super().__init__()
        self.k = k
        self.W_enc = nn.Parameter(F.normalize(torch.randn(n_latents, d_in), dim=1))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(self.W_enc.detach().clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_scale", torch.ones(()))

    @classmethod
    def from_sae(cls, sae: SparseAutoencoder) -> DenseTopKReference:
        """A reference with a copy of a TopK SAE's weights."""
        ref = cls(sae.spec.d_in, sae.spec.n_latents, sae.spec.k)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "input_scale"):
                getattr(ref, name).copy_(getattr(sae, name))
        return ref

    def forward(self, x: Tensor) -> DenseOutput:
        xs = x * self.input_scale
        pre = F.linear(xs - self.b_dec, self.W_enc, self.b_enc)  # [B, n]
        top = pre.topk(self.k, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))  # [B, n]
        xs_hat = z @ self.W_dec + self.b_dec  # [B, d]
        return DenseOutput(xs_hat=xs_hat, z=z, mse=(xs_hat - xs).pow(2).mean())
