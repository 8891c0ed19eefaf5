"""Which latents fire: BatchTopK's selection over a whole batch, its inference threshold, and Matryoshka's
nested reconstructions. The per-token TopK selection is ``tide_core.kernels.topk``.

BatchTopK (Bussmann, Leask & Nanda 2024) keeps the B * k largest pre-activations of a training batch of B
tokens, wherever they fall: k latents per token on average, more on tokens with more to say. Its
selection is packed into the rectangular layout the sparse autograd functions take: rows of ``width``
latents, as many rows per token as its count needs (``rows`` names each row's token), the last one padded
with zeros that ReLU drops with their gradient. A token's reconstruction sums its rows. Padding every token
to the largest count instead would cost B * max-count pairs, several times B * k on real activations. At
inference the batch is gone: a latent fires where its pre-activation exceeds the running
average of the training batches' thresholds (a JumpReLU with one threshold for every latent), so an
image's latents never depend on the other images encoded with it.

Matryoshka (Bussmann et al. 2025; Nabeshima 2024): the dictionary's prefixes [0, w_1) < [0, w_2) < ... <
[0, n) each reconstruct the input on their own; the loss averages their MSEs, so the first latents learn the
general directions and later ones refine them. The selection is BatchTopK's over the whole dictionary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tide_core.kernels import TopKSelection
from tide_core.sae.sparse import Pairs, sparse_decode


@dataclass(frozen=True)
class BatchSelection:
    """A BatchTopK selection, packed: rows of selected latents, each row belonging to one token."""

    top: TopKSelection  # values, indices [R, width]; padding entries have value 0 (and latent 0)
    rows: Tensor  # [R] long: the token of each packed row, ascending
    threshold: Tensor  # [] the B*k-th largest pre-activation of the batch (no grad)


@torch.no_grad()
def batch_topk(pre: Tensor, k: int) -> BatchSelection:
    """The B * k largest entries of pre-activations pre [B, n] (ties at the threshold all kept)."""
    b, n = pre.shape
    threshold = _kth_largest(pre, b * k)
    chosen = pre >= threshold  # [B, n]
    counts = chosen.sum(1)  # [B] selected per token
    tok, col = chosen.nonzero(as_tuple=True)  # [P] each, token-major, latents ascending within a token
    width = max(1, k // 2)  # packed row width: padding costs under B * width pairs
    rows_of = (counts + width - 1) // width  # [B] packed rows per token
    first_row = rows_of.cumsum(0) - rows_of  # [B]
    pos = torch.arange(len(tok)) - (counts.cumsum(0) - counts)[tok]  # [P] place among the token's selections
    row, slot = first_row[tok] + pos // width, pos % width  # [P] each
    n_rows = int(rows_of.sum())
    values = pre.new_zeros(n_rows, width)
    indices = torch.zeros(n_rows, width, dtype=torch.long, device=pre.device)
    values[row, slot] = pre[tok, col]
    indices[row, slot] = col
    rows = torch.repeat_interleave(torch.arange(b, device=pre.device), rows_of)  # [R]
    return BatchSelection(TopKSelection(values, indices), rows, threshold)


def _kth_largest(values: Tensor, kth: int) -> Tensor:
    """The kth largest entry of ``values`` (any shape) as a 0-d tensor. On the CPU through numpy's
    introselect: 0.8 ms for a [1024, 1024] batch on one thread, where torch.kthvalue takes 17 ms and
    torch.topk 9 ms (half of a training step)."""
    flat = values.reshape(-1)
    pos = flat.numel() - min(kth, flat.numel())  # ascending position of the kth largest
    if flat.device.type == "cpu":
        return torch.tensor(np.partition(flat.numpy(), pos)[pos], dtype=flat.dtype)
    return flat.kthvalue(pos + 1).values


def threshold_mask(pre: Tensor, threshold: Tensor) -> Tensor:
    """Inference: dense latents [B, n] of pre-activations pre [B, n], those at or below ``threshold`` zeroed.
    A threshold below 0 (-inf before any training batch) acts as 0: only positive values ever fire."""
    return torch.where(pre > threshold.clamp_min(0.0), pre, 0.0)  # [B, n]


def nested_decodes(idx: Tensor, val: Tensor, w_dec: Tensor, pairs: Pairs | None, widths: list[int],
                   rows: Tensor | None = None, n_tokens: int = 0) -> list[Tensor]:
    """The reconstruction (without b_dec) [B, d] of each prefix [0, w) of the dictionary (Matryoshka; the
    last width is the whole dictionary), from selected latents idx, val [R, m]. ``rows`` [R] maps packed
    rows to their tokens (BatchTopK), whose reconstructions are the sums of their rows'."""
    outs = []
    for w in widths:
        v = val if w >= w_dec.shape[0] else val * (idx < w)  # [R, m]: only this prefix's latents
        part = sparse_decode(idx, v, w_dec, pairs)  # [R, d]
        outs.append(part if rows is None else part.new_zeros(n_tokens, part.shape[1]).index_add(0, rows, part))
    return outs
