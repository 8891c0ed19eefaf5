"""The kernels in plain torch and numpy: what runs where numba does not (TIDE_KERNELS=torch, or a failed
compile), and the definition the compiled kernels are tested against.

Every function returns what its compiled twin returns, bit for bit: the same top-k set (equal values
go to the lower position), the same pair order, the same counts, and float64 sums added in the same
(token) order. Speed is secondary: these are vectorised but make several passes where the compiled
loops make one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from tide_core.kernels.hist import hist_bins_exact
from tide_core.kernels.records import EMPTY, FeatureCounts, LatentPairs, TopKSelection, TopLists


@torch.no_grad()
def topk_cpu(pre: Tensor, k: int, threads: int = 1) -> TopKSelection | None:
    """Exact top-k of each row of pre [B, n], equal values lowest position first; None if a row has a NaN
    (the caller then uses torch.topk, as for the compiled kernel). ``threads`` is torch's own.

    The columns come in the compiled kernel's order too (the entries above the k-th value by position,
    then the ties by position), so sums over them, and SAE training, match it bit for bit.
    """
    if bool(torch.isnan(pre).any()):
        return None
    n = pre.shape[1]
    kth = pre.topk(k, dim=1).values[:, -1:]  # [B, 1] the k-th largest value of each row
    above = pre > kth  # [B, n] fewer than k per row
    tied = pre == kth  # [B, n]
    need = k - above.sum(1, keepdim=True)  # [B, 1] ties still to take, lowest positions first
    keep = above | (tied & (tied.cumsum(1) <= need))  # [B, n] exactly k per row
    indices = keep.nonzero()[:, 1].view(-1, k)  # [B, k] ascending positions
    values = pre.gather(1, indices)  # [B, k]
    order = (indices + n * (values == kth)).argsort(1)  # [B, k] ties after the rest, each by position
    return TopKSelection(values.gather(1, order), indices.gather(1, order))


def pairs_by_latent(idx: Tensor, n_latents: int) -> LatentPairs:
    """The pairs of idx [B, k] grouped by latent: a stable sort of the flat ids (any device)."""
    flat = idx.reshape(-1)  # [B*k]
    order = flat.argsort(stable=True)  # [B*k] pair positions, grouped by latent
    crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=idx.device)  # [n+1]
    torch.cumsum(torch.bincount(flat, minlength=n_latents), 0, out=crow[1:])
    return LatentPairs(order=order, tokens=order // idx.shape[1], crow=crow)


def count_fired(counts: FeatureCounts, rows: np.ndarray, latents: np.ndarray, values: np.ndarray,
                tokens_per_image: int, first_image: int, sample_class: np.ndarray) -> None:
    """Count the firing candidates (value > 0) of token rows of images first_image.. into counts."""
    live = np.asarray(values) > 0  # [m]
    latents = np.asarray(latents, np.int64)[live]
    v = np.asarray(values, np.float32)[live]
    s = first_image + np.asarray(rows, np.int64)[live] // tokens_per_image  # [m'] image of each
    c = np.asarray(sample_class, np.int64)[s]
    # ufunc.at applies its updates one at a time in index order: the compiled loop's order and sums
    np.add.at(counts.fires, (c, latents), 1)
    np.add.at(counts.act_sum, (c, latents), v)
    np.add.at(counts.hist, (latents, hist_bins_exact(v)), 1)
    np.maximum.at(counts.per_image, (latents, s), v)


def count_topk(counts: FeatureCounts, pre: np.ndarray, first_row: int, bias: np.ndarray, k: int,
               tokens_per_image: int, first_image: int, sample_class: np.ndarray) -> bool:
    """Add bias into pre [T, n] in place, select each row's top k, count their ReLU'd values. False if a
    row had a NaN (nothing counted)."""
    np.add(pre, bias, out=pre)  # the same IEEE add as the compiled sweep's
    top = topk_cpu(torch.from_numpy(pre), k)
    if top is None:
        return False
    t = len(pre)
    rows = np.repeat(np.arange(first_row, first_row + t), k)  # [T*k] row-major: token order
    count_fired(counts, rows, top.indices.numpy().reshape(-1), top.values.numpy().reshape(-1),
                tokens_per_image, first_image, sample_class)
    return True


def encoder_input(x: np.ndarray, scale: float, gain: np.ndarray | None, shift: np.ndarray | None,
                  b_dec: np.ndarray, out: np.ndarray) -> None:
    """out [T, d] = ((x * scale) * gain + shift) - b_dec, one float32 operation at a time."""
    np.multiply(x, np.float32(scale), out=out)
    if gain is not None:
        np.multiply(out, gain, out=out)
        np.add(out, shift, out=out)
    np.subtract(out, b_dec, out=out)


def top_images(per_image: np.ndarray, sample_ids: np.ndarray, top_n: int) -> TopLists:
    """Of per_image [n, b], each latent's top_n activations > 0 and their sample ids, descending (equal
    activations: lower sample id first); the boundary's ties taken lowest position first."""
    n, b = per_image.shape
    keep = min(top_n, b)
    top = TopLists(np.full((n, top_n), EMPTY, np.float32), np.full((n, top_n), -1, np.int64))
    sel = topk_cpu(torch.from_numpy(np.ascontiguousarray(per_image, np.float32)), keep)
    if sel is None or keep == 0:
        return top
    val, sid = sel.values.numpy(), np.asarray(sample_ids, np.int64)[sel.indices.numpy()]  # [n, keep]
    order = np.lexsort((sid, -val), axis=1)  # by activation descending, then sample id
    val, sid = np.take_along_axis(val, order, 1), np.take_along_axis(sid, order, 1)
    fired = val > 0
    top.values[:, :keep] = np.where(fired, val, EMPTY)
    top.sample_ids[:, :keep] = np.where(fired, sid, -1)
    return top


def merge_top(a: TopLists, b: TopLists) -> TopLists:
    """The first N (a's width) of two descending lists merged (ties: a's first): a stable sort of the two
    side by side."""
    val = np.concatenate([a.values, b.values], 1)  # [F, Na + Nb]
    sid = np.concatenate([a.sample_ids, b.sample_ids], 1)
    order = np.argsort(-val, axis=1, kind="stable")[:, :a.values.shape[1]]
    return TopLists(np.take_along_axis(val, order, 1), np.take_along_axis(sid, order, 1))
