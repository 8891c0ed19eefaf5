"""Model-agnostic measures of generated images: Frechet distances between feature sets, and the pixel
feature space used when a model family has no judge of its own."""

from __future__ import annotations

import numpy as np

POOLED_SIDE = 8  # pixel features: each channel average-pooled to an 8 x 8 grid


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (round-off negatives clipped to 0)."""
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, F] and b [M, F].

    tr sqrt(cov_a cov_b) is taken as tr sqrt(R cov_b R) with R = cov_a^(1/2): the same number (the two
    products are similar matrices), but symmetric, so eigvalsh gives it. It stays exact when a feature
    never varies (a dead ReLU unit makes the covariances singular), where scipy's general sqrtm warns.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = _psd_sqrt(cov_a)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ cov_b @ root), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


def pixel_features(images: np.ndarray, side: int = POOLED_SIDE) -> np.ndarray:
    """A crude but model-free feature space: images [N, C, H, W] average-pooled to [N, C * side * side] (the
    sides must be multiples of ``side``, or smaller images are used whole)."""
    n, c, h, w = images.shape
    if h % side or w % side:
        return images.reshape(n, -1).astype(np.float64)
    pooled = images.reshape(n, c, side, h // side, side, w // side).mean(axis=(3, 5))  # [N, C, side, side]
    return pooled.reshape(n, -1).astype(np.float64)
