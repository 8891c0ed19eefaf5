"""What the kernels take and return, the same for the compiled and the pure implementations."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from tide_core.kernels.hist import HIST_EDGES

EMPTY = -np.inf  # top-list slots not filled yet


@dataclass(frozen=True)
class TopKSelection:
    """The k largest entries of each row."""

    values: Tensor  # [B, k], in no particular order
    indices: Tensor  # [B, k] long


@dataclass(frozen=True)
class LatentPairs:
    """The B*k (token, latent) pairs of a selection idx [B, k], grouped by latent: a CSR matrix
    [n_latents, B]."""

    order: Tensor  # [B*k] long flat pair positions (t * k + j), by latent, stable within a latent
    tokens: Tensor  # [B*k] long token of each pair, in that order (the CSR column indices)
    crow: Tensor  # [n_latents + 1] long CSR row pointers: latent l's pairs are order[crow[l]:crow[l+1]]


@dataclass(frozen=True)
class TopLists:
    """Each latent's best images, descending; equal activations: lower sample id first."""

    values: np.ndarray  # float32 [n, N] image activations (EMPTY = unfilled)
    sample_ids: np.ndarray  # int64 [n, N] (-1 = unfilled)


@dataclass(frozen=True)
class FeatureCounts:
    """The counters of one diffusion step over some images, filled in place by the feature-pass kernels."""

    fires: np.ndarray  # int64 [C, n] tokens where the latent fired, by class
    act_sum: np.ndarray  # float64 [C, n] sum of its activations there, by class
    hist: np.ndarray  # int64 [n, B] firing activations per HIST_EDGES bin
    per_image: np.ndarray  # float32 [n, b] image activation = max over the image's tokens (its max over
    # images is the latent's max activation, so that needs no counter of its own)

    @classmethod
    def zeros(cls, n_classes: int, n_latents: int, images: int) -> FeatureCounts:
        return cls(fires=np.zeros((n_classes, n_latents), np.int64),
                   act_sum=np.zeros((n_classes, n_latents), np.float64),
                   hist=np.zeros((n_latents, len(HIST_EDGES) - 1), np.int64),
                   per_image=np.zeros((n_latents, images), np.float32))


_WORK = threading.local()


def workspace(name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A scratch array of ``shape`` kept per thread (contents undefined): fresh multi-MB arrays cost page
    faults on every chunk (measured: ~0.4 ms of a ~10 ms chunk). One buffer per name grows to the most
    rows asked for; a request for fewer gets its leading rows, still C-contiguous."""
    buf = getattr(_WORK, name, None)
    if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:] or buf.dtype != dtype:
        buf = np.empty(shape, dtype)
        setattr(_WORK, name, buf)
    return buf[:shape[0]]
