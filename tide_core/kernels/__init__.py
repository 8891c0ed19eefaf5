"""Every compiled CPU kernel of tide_core, behind one entry point, each with a pure torch/numpy twin.

Callers (the SAE, the feature pass) import only from here:

* ``topk(pre, k)``: the exact top-k of each row, the hot loop of TopK SAE training and of the feature
  pass. Float32 CPU tensors go to the kernels (equal values: lower position first); other devices, and
  a batch with a NaN in a row, to torch.topk as is (which ranks NaN as the largest value).
* ``pairs_by_latent(idx, n_latents)``: the (token, latent) pairs of a selection grouped by latent, which
  the sparse SAE gradients share.
* The feature pass: ``encoder_input``, ``count_topk`` (select and count in one sweep), ``count_fired``,
  ``top_images``, ``merge_top``, over a ``FeatureCounts``.

Which implementation serves them (``backend``): compiled with numba (``numba_topk.py``,
``numba_features.py``, with vector loops written as LLVM IR in ``simd.py``) unless ``TIDE_KERNELS=torch``
or a compile fails; then the pure ones of ``reference.py``. Both give the same results, which the tests
check. Nothing is compiled at import.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from tide_core.kernels import backend, reference
from tide_core.kernels.hist import HIST_EDGES
from tide_core.kernels.records import EMPTY, FeatureCounts, LatentPairs, TopKSelection, TopLists, workspace

__all__ = [
    "EMPTY", "HIST_EDGES", "FeatureCounts", "LatentPairs", "TopKSelection", "TopLists", "backend",
    "count_fired", "count_topk", "encoder_input", "merge_top", "pairs_by_latent", "top_images",
    "topk", "workspace",
]

ROWS_PER_THREAD = 256  # a numba thread pays for its launch from about this many rows of a 1024-wide top-k


@torch.no_grad()
def topk(pre: Tensor, k: int) -> TopKSelection:
    """The exact top-k of each row of pre [B, n] (values and indices [B, k], in no particular order).

    On the CPU in float32, equal values go to the lower index, on either backend. torch.topk costs
    ~4.5 µs per 1024-wide row, half a TopK SAE's training step; the compiled kernel takes ~0.45 µs and
    splits rows over torch's intra-op thread count.
    """
    if pre.ndim != 2:
        raise ValueError(f"topk takes a [rows, n] tensor; got shape {tuple(pre.shape)}")
    b, n = pre.shape
    if not 1 <= k <= n:
        raise ValueError(f"top-k needs 1 <= k <= n; got k={k}, n={n}")
    if pre.device.type == "cpu" and pre.dtype == torch.float32 and k < n:
        threads = max(1, min(torch.get_num_threads(), b // ROWS_PER_THREAD))
        top = backend.ops("topk_parallel" if threads > 1 else "topk").topk_cpu(pre, k, threads)
        if top is not None:
            return top
    top = pre.topk(k, dim=1, sorted=False)
    return TopKSelection(top.values, top.indices)


def pairs_by_latent(idx: Tensor, n_latents: int) -> LatentPairs:
    """Group the B*k (token, latent) pairs of idx [B, k] by latent, stably: a CSR matrix [n_latents, B]."""
    impl = backend.ops("pairs") if idx.device.type == "cpu" else reference
    return impl.pairs_by_latent(idx, n_latents)


def count_fired(counts: FeatureCounts, rows: np.ndarray, latents: np.ndarray, values: np.ndarray,
                tokens_per_image: int, first_image: int, sample_class: np.ndarray) -> None:
    """Count firing candidates [m] into ``counts``: (token row, latent, value) triples, skipping values
    <= 0; row r belongs to image first_image + r // tokens_per_image, of class sample_class[image]. Each
    value lands in HIST_EDGES bin searchsorted(edges, v, "right") - 1 (outside the edges: the end bins)."""
    backend.ops("features").count_fired(counts, rows, latents, values, tokens_per_image, first_image,
                                        sample_class)


def count_topk(counts: FeatureCounts, pre: np.ndarray, first_row: int, bias: np.ndarray, k: int,
               tokens_per_image: int, first_image: int, sample_class: np.ndarray) -> bool:
    """A TopK SAE's latents of token rows first_row.. selected and counted in one sweep: pre [T, n] is the
    encoder matmul without its bias (float32, C order), which is added in place; each row's top k,
    ReLU'd, are counted as ``count_fired`` would. False if a row had a NaN: nothing is counted."""
    return backend.ops("features").count_topk(counts, pre, first_row, bias, k, tokens_per_image, first_image,
                                              sample_class)


def encoder_input(x: np.ndarray, scale: float, gain: np.ndarray | None, shift: np.ndarray | None,
                  b_dec: np.ndarray, out: np.ndarray) -> None:
    """out [T, d] = ((x * scale) * gain + shift) - b_dec (float32, C order): SparseAutoencoder.encoder_input
    at one timestep, the same float32 operations in the same order, so the same bits. gain/shift None: no
    modulation."""
    backend.ops("features").encoder_input(x, scale, gain, shift, b_dec, out)


def top_images(per_image: np.ndarray, sample_ids: np.ndarray, top_n: int) -> TopLists:
    """Each latent's best images at one step: of per_image [n, b] (image activations of sample_ids [b]),
    the top_n activations > 0, descending (unfilled: EMPTY / -1)."""
    return backend.ops("features").top_images(per_image, sample_ids, top_n)


def merge_top(a: TopLists, b: TopLists) -> TopLists:
    """The N largest (N = a's width) of two descending top lists [F, N], descending; ties: a's first."""
    return backend.ops("features").merge_top(a, b)
