"""Nearest latents by decoder direction (the ``feature_neighbors`` table)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
