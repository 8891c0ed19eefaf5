"""The sparse machinery that makes TopK training cheap: two custom autograd functions that touch only the
selected latents, sharing one grouping of the (token, latent) pairs by latent.

The encoder matmul x @ W_enc^T ([B, n_latents]) is unavoidable, but nothing else needs the dense latent.
The top-k indices are picked without autograd (``tide_core.kernels.topk``), their values get a custom
backward that touches only the k selected encoder rows (``_SelectedPreActs``), and decoding is an
``embedding_bag`` over the k active decoder rows (``_SparseDecode``). Both weight gradients are sparse
[n_latents, B] @ [B, d_in] products over the same pairs (``Pairs``: a compiled counting sort on CPU). A
plain dense TopK SAE does five [B x d_in x n_latents] matmuls per step (encode, decode, three in
backward); this does one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tide_core.kernels import TopKSelection, pairs_by_latent


@dataclass(frozen=True)
class SparseLatents:
    """TopK latents of a batch in sparse form."""

    idx: Tensor  # [B, k] long: which latents
    val: Tensor  # [B, k] float >= 0: their activations (zero where a top-k pre-activation was negative)


class Pairs:
    """The B*k (token, latent) pairs of a selection idx [B, k], sorted by latent.

    Weight gradients of the sparse encoder and decoder are sums over the tokens each latent was active
    on: in this order each is one CSR [n_latents, B] @ [B, d] product, and both share one sort.
    """

    def __init__(self, idx: Tensor, n_latents: int):
        grouped = pairs_by_latent(idx, n_latents)
        self.order, self.tokens = grouped.order, grouped.tokens  # [B*k] each
        self.crow = grouped.crow  # [n+1]
        self.idx = idx
        self.shape = (n_latents, idx.shape[0])

    def latent_sums(self, weights: Tensor, rows: Tensor) -> Tensor:
        """out[l] = sum over pairs (b, j) with idx[b, j] = l of weights[b, j] * rows[b]  ->  [n_latents, d]."""
        w = weights.reshape(-1)[self.order]  # [B*k], in pair order
        with warnings.catch_warnings():
            # torch calls CSR tensors "beta"; this product is tested against the dense reference.
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            csr = torch.sparse_csr_tensor(self.crow, self.tokens, w, self.shape, check_invariants=False)  # [n, B]
        return csr @ rows


class _SelectedPreActs(torch.autograd.Function):
    """pre[b, j] = xc[b] . W_enc[idx[b, j]] + b_enc[idx[b, j]] for the selected latents idx [B, m].

    The forward values were already computed by the dense no-grad encoder matmul, so the forward only
    returns them; the backward is what matters: it never builds the dense [B, n_latents] gradient.
    """

    @staticmethod
    def forward(ctx, xc: Tensor, w_enc: Tensor, b_enc: Tensor, pairs: Pairs, values: Tensor) -> Tensor:
        ctx.save_for_backward(xc, w_enc)
        ctx.pairs = pairs
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, w_enc = ctx.saved_tensors
        pairs: Pairs = ctx.pairs
        g = grad.contiguous()  # [B, m]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(pairs.idx, w_enc, per_sample_weights=g, mode="sum")  # [B, d]
        if ctx.needs_input_grad[1]:
            grad_w = pairs.latent_sums(g, xc)  # [n, d]
        if ctx.needs_input_grad[2]:
            grad_b = g.new_zeros(w_enc.shape[0]).index_add_(0, pairs.idx.reshape(-1), g.reshape(-1))  # [n]
        return grad_x, grad_w, grad_b, None, None


class _SparseDecode(torch.autograd.Function):
    """sum_j val[b, j] * W_dec[idx[b, j]] -> [B, d]: a gather of the k active decoder rows per token."""

    @staticmethod
    def forward(ctx, val: Tensor, w_dec: Tensor, pairs: Pairs) -> Tensor:
        ctx.save_for_backward(val, w_dec)
        ctx.pairs = pairs
        return F.embedding_bag(pairs.idx, w_dec, per_sample_weights=val, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        val, w_dec = ctx.saved_tensors
        pairs: Pairs = ctx.pairs
        grad = grad.contiguous()  # [B, d]
        grad_val = grad_w = None
        if ctx.needs_input_grad[0]:
            # d/dval[b, j] = W_dec[idx[b, j]] . grad[b]: embedding_bag's own backward computes exactly that
            # without materialising the [B, k, d] gathered rows.
            with torch.enable_grad():
                v = val.detach().requires_grad_()
                out = F.embedding_bag(pairs.idx, w_dec.detach(), per_sample_weights=v, mode="sum")
                (grad_val,) = torch.autograd.grad(out, v, grad)
        if ctx.needs_input_grad[1]:
            grad_w = pairs.latent_sums(val, grad)  # [n, d]
        return grad_val, grad_w, None


def sparse_decode(idx: Tensor, val: Tensor, w_dec: Tensor, pairs: Pairs | None = None) -> Tensor:
    """sum_j val[b, j] * W_dec[idx[b, j]] -> [B, d_in]; pass ``pairs`` to reuse a sort shared with the encoder."""
    if not (torch.is_grad_enabled() and (val.requires_grad or w_dec.requires_grad)):
        return F.embedding_bag(idx, w_dec, per_sample_weights=val, mode="sum")
    return _SparseDecode.apply(val, w_dec, pairs if pairs is not None else Pairs(idx, w_dec.shape[0]))


@dataclass(frozen=True)
class Selected:
    """Selected latents of a batch, with the pair plan their gradients share (None without autograd)."""

    idx: Tensor  # [B, m] long
    val: Tensor  # [B, m] >= 0
    pairs: Pairs | None


def select(xc: Tensor, w_enc: Tensor, b_enc: Tensor, top: TopKSelection) -> Selected:
    """ReLU'd values of the selected pre-activations of encoder inputs xc [B, d], differentiable through
    the sparse backward when autograd needs them."""
    if not (torch.is_grad_enabled() and (xc.requires_grad or w_enc.requires_grad)):
        return Selected(top.indices, F.relu(top.values), None)
    pairs = Pairs(top.indices, w_enc.shape[0])
    val = F.relu(_SelectedPreActs.apply(xc, w_enc, b_enc, pairs, top.values))  # [B, m]
    return Selected(top.indices, val, pairs)
