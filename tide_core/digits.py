"""The bundled training data: scikit-learn's 1,797 handwritten digits (8x8, 10 classes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASS_NAMES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class DigitsData:
    """Digits upsampled to a square size and scaled to [-1, 1]."""

    images: np.ndarray  # float32 [N, 1, S, S] in [-1, 1]
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


def load_digits(size: int = 16) -> DigitsData:
    """All 1,797 digits, bilinearly upsampled from 8x8 to size x size."""
    from sklearn.datasets import load_digits as sk_load

    raw = sk_load()
    x = raw.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    if size != 8:
        x = resize_bilinear(x, size)
    return DigitsData(images=(x * 2.0 - 1.0)[:, None], labels=raw.target.astype(np.int64))


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of rows: (train rows, test rows), each ascending."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))])
    mask = np.zeros(len(labels), bool)
    mask[test_idx] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def split(data: DigitsData, test_fraction: float, seed: int) -> tuple[DigitsData, DigitsData]:
    """Deterministic stratified train/test split."""
    train, test = split_indices(data.labels, test_fraction, seed)
    pick = lambda rows: DigitsData(images=data.images[rows], labels=data.labels[rows])  # noqa: E731
    return pick(train), pick(test)


def resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """[N, h, w] -> [N, size, size], align_corners=False, matching torch's bilinear."""
    n, h, w = x.shape

    def axis(src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(size) + 0.5) * src / size - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    ylo, yhi, wy = axis(h)
    xlo, xhi, wx = axis(w)
    top = x[:, ylo][:, :, xlo] * (1 - wx) + x[:, ylo][:, :, xhi] * wx
    bot = x[:, yhi][:, :, xlo] * (1 - wx) + x[:, yhi][:, :, xhi] * wx
    return (top * (1 - wy[:, None]) + bot * wy[:, None]).astype(np.float32)
