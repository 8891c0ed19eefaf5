"""Sparse probing: at which diffusion step, and in which block, a generative factor of the final image can
be read off the activations, by a few SAE latents or by all of the block's channels.

An image's representation at a step is its activations averaged over its image tokens: the block's raw
channels [d], or the SAE's latents [n] (each token encoded at the step's timestep, then averaged). The label
is the factor value the judge sees in the final image, so a probe asks "is what this image will show already
decided here?" (for a model that ignores part of a prompt, the asked value would be noise).

The probes are SAEBench's: the k latents whose means differ most between the factor's values (ANOVA F on
the training fold) feed a logistic regression, for k in ``PROBE_KS``; k = 0 is the same regression on every
raw channel, the baseline the latents are measured against. Accuracy is stratified k-fold cross-validated
(every image is held out once); values seen on fewer images than there are folds are left out of the probe.
scikit-learn does the selection, scaling, regression and folds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

PROBE_KS = (1, 4, 16)
RAW_PROBE = 0  # k of the probe on the raw channels


@dataclass(frozen=True)
class ProbeRows:
    """factor_probes rows of one SAE (without sae_id), as columns: one per (factor, step, k)."""

    factor: list[str]  # [R]
    step: np.ndarray  # int64 [R]
    k: np.ndarray  # int64 [R]; RAW_PROBE: every raw channel
    accuracy: np.ndarray  # float64 [R] mean held-out accuracy over the folds
    accuracy_std: np.ndarray  # float64 [R] its spread over the folds
    chance: np.ndarray  # float64 [R] the most common value's share: what always guessing it scores
    n_images: np.ndarray  # int64 [R]
    n_values: np.ndarray  # int64 [R]
    features: list[list[int] | None]  # [R] the k latents chosen on all the images; None for raw probes


@torch.no_grad()
def pooled(acts: np.ndarray, encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
           block: int = 8192) -> np.ndarray:
    """Per-image means over tokens: acts [N, P, d] -> [N, d], or of ``encode``'s latents -> [N, n].
    Encodes ``block`` tokens at a time so a wide SAE's dense latents never exist for a whole step."""
    n_img, p, d = acts.shape
    flat = torch.from_numpy(np.ascontiguousarray(acts).reshape(n_img * p, d)).float()  # [N*P, d]
    if encode is None:
        return flat.reshape(n_img, p, d).mean(1).numpy()
    out = None
    for r0 in range(0, n_img * p, block):
        z = encode(flat[r0:r0 + block])  # [rows, n]
        if out is None:
            out = torch.zeros(n_img, z.shape[1], dtype=torch.float64)
        rows = torch.arange(r0, r0 + z.shape[0]) // p  # image of each token
        out.index_add_(0, rows, z.double())
    return (out / p).float().numpy()


def _probe(k: int, seed: int):
    from sklearn.feature_selection import SelectKBest, f_classif
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    head = LogisticRegression(max_iter=2000, random_state=seed)
    if k == RAW_PROBE:
        return make_pipeline(StandardScaler(), head)
    return make_pipeline(SelectKBest(f_classif, k=k), StandardScaler(), head)


def probe_accuracy(x: np.ndarray, y: np.ndarray, k: int, folds: int, seed: int) -> tuple[float, float]:
    """Held-out accuracy (mean, std over folds) of the k-sparse probe (k = RAW_PROBE: all of x [N, D])
    predicting labels y [N]."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    with warnings.catch_warnings():  # latents that never fire in a fold have no F statistic: ranked last
        warnings.simplefilter("ignore", category=RuntimeWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        scores = cross_val_score(_probe(min(k, x.shape[1]), seed), x, y,
                                 cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return float(scores.mean()), float(scores.std())


def top_latents(x: np.ndarray, y: np.ndarray, k: int) -> list[int]:
    """The k columns of x [N, n] with the largest ANOVA F between the values of y (what the probe picks)."""
    from sklearn.feature_selection import f_classif

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        f, _ = f_classif(x, y)
    f = np.nan_to_num(f, nan=-1.0)
    return [int(i) for i in np.argsort(-f, kind="stable")[:k]]


def usable_labels(y: np.ndarray, folds: int) -> np.ndarray:
    """Images whose value is seen on at least ``folds`` images [N] bool (stratified folds need them)."""
    values, counts = np.unique(y, return_counts=True)
    return np.isin(y, values[counts >= folds])


def factor_probes(latents: dict[int, np.ndarray], labels: np.ndarray, factor_names: Sequence[str],
                  ks: Sequence[int], folds: int, seed: int = 0) -> ProbeRows:
    """Probe every factor at every step. ``latents`` maps a step to pooled features [N, D] (SAE latents for
    k > 0, raw channels for k = RAW_PROBE); labels [N, F] value codes (< 0: unknown, left out)."""
    from threadpoolctl import threadpool_limits

    cols: dict[str, list] = {k: [] for k in ProbeRows.__dataclass_fields__}
    with threadpool_limits(1):  # BLAS threads only spin on fits this small: 122 s -> 5 s a layer on 2 cores
        for j, factor in enumerate(factor_names):
            known = labels[:, j] >= 0
            keep = known & usable_labels(np.where(known, labels[:, j], -1), folds)
            y = labels[keep, j]
            values, counts = np.unique(y, return_counts=True)
            if len(values) < 2:
                continue  # nothing to tell apart
            for step, x in latents.items():
                xs = x[keep]
                for k in ks:
                    mean, std = probe_accuracy(xs, y, k, folds, seed)
                    row = {"factor": factor, "step": step, "k": k, "accuracy": mean, "accuracy_std": std,
                           "chance": counts.max() / counts.sum(), "n_images": len(y), "n_values": len(values),
                           "features": None if k == RAW_PROBE else top_latents(xs, y, k)}
                    for name, v in row.items():
                        cols[name].append(v)
    as_array = {"step": np.int64, "k": np.int64, "accuracy": np.float64, "accuracy_std": np.float64,
                "chance": np.float64, "n_images": np.int64, "n_values": np.int64}
    return ProbeRows(**{name: np.asarray(v, as_array[name]) if name in as_array else v for name, v in cols.items()})
