"""Feature-factor association (tide_core/features/factor_association.py) against a plain loop over
conditions, values and latents, and its meaning on latents built to be informative or not."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tide_core.factors import UNASKED, ConditionFactors
from tide_core.features.factor_association import factor_association
from tide_core.features.summary import FeatureSummary

OVERALL = -1


def _summary(fires: np.ndarray, class_tokens: np.ndarray) -> FeatureSummary:
    s, c, n = fires.shape
    return FeatureSummary(steps=np.arange(s, dtype=np.int64) * 5, tokens=class_tokens.sum(1), class_tokens=class_tokens,
                          fires=fires, act_sum=fires.astype(np.float64), act_max=np.ones((s, n), np.float32),
                          hist=np.zeros((n, 4), np.int64), top_val=np.zeros((s, n, 1), np.float32),
                          top_sid=np.zeros((s, n, 1), np.int64))


def _h(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _plain(fires, tokens, codes, n_values, f):
    """(best value, mi, normalized mi, best rate, lift) of latent f from counts by loops; None if it never fired."""
    tv = [sum(tokens[c] for c in range(len(codes)) if codes[c] == v) for v in range(n_values)]
    fv = [sum(fires[c, f] for c in range(len(codes)) if codes[c] == v) for v in range(n_values)]
    total, fired = sum(tv), sum(fv)
    if fired == 0 or total == 0:
        return None
    rates = [fv[v] / tv[v] if tv[v] else -1.0 for v in range(n_values)]
    mi = _h(fired / total) - sum(tv[v] / total * _h(rates[v]) for v in range(n_values) if tv[v])
    hv = -sum(t / total * math.log2(t / total) for t in tv if t)
    best = int(np.argmax(rates))
    return best, max(mi, 0.0), max(mi, 0.0) / hv if hv else 0.0, rates[best], rates[best] / (fired / total)


def test_the_association_equals_a_plain_loop():
    rng = np.random.default_rng(0)
    s, c, n = 3, 7, 5
    tokens = rng.integers(10, 50, size=(s, c))
    fires = np.minimum(rng.integers(0, 30, size=(s, c, n)), tokens[:, :, None])
    fires[:, :, 4] = 0  # a latent that never fires has no rows
    codes = np.array([[0, 1], [1, UNASKED], [2, 0], [0, 0], [1, 1], [UNASKED, 1], [2, UNASKED]])
    asked = ConditionFactors(("class", "colour"), (("a", "b", "c"), ("red", "blue")), codes)
    got = factor_association(_summary(fires, tokens), asked, OVERALL)
    rows = {(int(f), fa, int(st)): i for i, (f, fa, st) in enumerate(zip(got.feature_id, got.factor, got.step,
                                                                           strict=True))}
    assert len(rows) == len(got.feature_id)  # the grain is unique
    steps = [*range(s), None]
    for j, factor in enumerate(asked.names):
        for step in steps:
            fs = fires.sum(0) if step is None else fires[step]
            ts = tokens.sum(0) if step is None else tokens[step]
            label = OVERALL if step is None else step * 5
            for f in range(n):
                want = _plain(fs, ts, codes[:, j], len(asked.values[j]), f)
                key = (f, factor, label)
                assert (key in rows) == (want is not None), key
                if want is None:
                    continue
                i = rows[key]
                assert got.best_value[i] == asked.values[j][want[0]]
                assert got.mutual_info[i] == pytest.approx(want[1], abs=1e-12)
                assert got.normalized_mi[i] == pytest.approx(want[2], abs=1e-12)
                assert got.best_rate[i] == pytest.approx(want[3]) and got.lift[i] == pytest.approx(want[4])


def test_a_latent_that_fires_on_one_value_only_carries_its_factor():
    tokens = np.full((1, 4), 100)
    codes = np.array([[0], [0], [1], [1]])  # two values, two conditions each
    fires = np.zeros((1, 4, 2), np.int64)
    fires[0, :2, 0] = 100  # latent 0: every token of value 0, none of value 1 -> H(v) = 1 bit, all of it
    fires[0, :, 1] = 30  # latent 1: the same rate everywhere -> nothing
    got = factor_association(_summary(fires, tokens), ConditionFactors(("f",), (("x", "y"),), codes), OVERALL)
    first = (got.feature_id == 0) & (got.step == 0)
    flat = (got.feature_id == 1) & (got.step == 0)
    assert got.normalized_mi[first][0] == pytest.approx(1.0) and got.best_value[int(np.flatnonzero(first)[0])] == "x"
    assert got.mutual_info[flat][0] == pytest.approx(0.0, abs=1e-12) and got.lift[flat][0] == pytest.approx(1.0)
