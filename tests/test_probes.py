"""Sparse factor probes: pooling against a plain loop, the probe against a fold-by-fold reference, and a
planted latent found by the 1-sparse probe while the raw channels of noise stay at chance."""

import numpy as np
import torch

from tide_core.features.probes import (
    PROBE_KS,
    RAW_PROBE,
    factor_probes,
    pooled,
    probe_accuracy,
    top_latents,
)
from tide_core.sampling import spread_steps


def test_pooled_latents_equal_a_plain_per_image_loop():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(5, 7, 4)).astype(np.float16)  # [N, P, d]
    w = torch.from_numpy(rng.normal(size=(4, 6)).astype(np.float32))

    def encode(x):
        return torch.relu(x @ w)  # [T, 6]

    fast = pooled(acts, encode, block=3)  # blocks that straddle images
    plain = np.stack([encode(torch.from_numpy(a.astype(np.float32))).mean(0).numpy() for a in acts])
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled(acts), acts.astype(np.float32).mean(1), rtol=1e-6)


def test_probe_accuracy_equals_a_fold_by_fold_reference():
    from sklearn.feature_selection import f_classif
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(60, 12)) + 0.8 * (y[:, None] == np.arange(12)[None, :] % 3)
    for k in (RAW_PROBE, 4):
        scores = []
        for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
            cols = np.arange(12) if k == RAW_PROBE else np.argsort(-f_classif(x[train], y[train])[0])[:k]
            mean, std = x[train][:, cols].mean(0), x[train][:, cols].std(0)
            head = LogisticRegression(max_iter=2000, random_state=0).fit((x[train][:, cols] - mean) / std, y[train])
            scores.append(head.score((x[test][:, cols] - mean) / std, y[test]))
        got, spread = probe_accuracy(x, y, k, folds=5, seed=0)
        assert abs(got - np.mean(scores)) < 1e-12 and abs(spread - np.std(scores)) < 1e-12


def test_a_planted_latent_is_found_and_noise_stays_at_chance():
    rng = np.random.default_rng(2)
    n = 90
    labels = np.stack([np.repeat(np.arange(3), 30), rng.integers(2, size=n)], axis=1)  # [N, 2]
    labels[:4, 1] = -1  # unknown values are left out
    latents = np.abs(rng.normal(size=(n, 40))) * (rng.random((n, 40)) < 0.2)  # sparse noise
    latents[:, 7] = labels[:, 0] + 0.05 * rng.normal(size=n)  # latent 7 tells factor "a"
    raw = rng.normal(size=(n, 16))
    rows = factor_probes({3: latents}, labels, ("a", "b"), PROBE_KS, folds=5)
    assert len(rows.factor) == 2 * len(PROBE_KS)
    a1 = [i for i in range(len(rows.factor)) if rows.factor[i] == "a" and rows.k[i] == 1][0]
    assert rows.accuracy[a1] == 1.0 and rows.features[a1] == [7] and rows.chance[a1] == 1 / 3
    b = [i for i in range(len(rows.factor)) if rows.factor[i] == "b"]
    assert all(rows.n_images[i] == n - 4 and rows.n_values[i] == 2 for i in b)
    base = factor_probes({3: raw}, labels, ("a", "b"), (RAW_PROBE,), folds=5)
    assert base.features == [None, None] and max(base.accuracy - base.chance) < 0.15
    assert top_latents(latents, labels[:, 0], 2)[0] == 7


def test_rare_values_and_single_value_factors_are_left_out():
    y = np.array([[0, 1]] * 10 + [[1, 1]] * 10 + [[2, 1]] * 3)  # value 2 of factor 0 on 3 images < 5 folds
    x = np.random.default_rng(3).normal(size=(len(y), 8))
    rows = factor_probes({0: x, 5: x}, y, ("a", "b"), (RAW_PROBE,), folds=5)
    assert rows.factor == ["a", "a"] and list(rows.step) == [0, 5]  # "b" has one value: nothing to probe
    assert list(rows.n_images) == [20, 20] and list(rows.n_values) == [2, 2]


def test_probe_steps_are_spread_from_the_first_to_the_last():
    assert spread_steps(list(range(50)), 10) == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49]
    assert spread_steps([0, 10, 20], 10) == [0, 10, 20]
    assert spread_steps([0, 10, 20, 30], 1) == [0]
