"""Conditions measured factor by factor: what each condition of a run asks of each factor a judge scores.

A class-conditional run has one factor, the class, and each condition asks for its own class. A
text-conditional run whose judge knows generative factors (the styled digits: class, colour, thickness,
background) asks for whatever its prompt names: "a red seven" asks class = seven and colour = red and
leaves thickness and background to the model. The quality report, the samples table and the concept table
read the same record, so a prompt means the same thing to all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

UNASKED = -1  # a condition that names no value of a factor


@dataclass(frozen=True)
class ConditionFactors:
    """The factor values each condition asks for."""

    names: tuple[str, ...]  # [F] factor names; the first is the class (the `samples` table's judge_pred)
    values: tuple[tuple[str, ...], ...]  # [F] each factor's values in code order
    codes: np.ndarray  # int64 [C, F]: the value code condition c asks for, UNASKED where it names none
    unknown: tuple[tuple[str, ...], ...] = ()  # [C] words of each condition that name no factor value

    def missing_values(self) -> dict[str, list[str]]:
        """Per factor, the values no condition asks for (a prompt set that cannot test them)."""
        out = {}
        for j, (name, values) in enumerate(zip(self.names, self.values, strict=True)):
            asked = set(self.codes[:, j].tolist())
            missing = [v for i, v in enumerate(values) if i not in asked]
            if missing:
                out[name] = missing
        return out

    def unknown_words(self) -> dict[str, int]:
        """Each word that names no factor value, with the number of conditions that use it."""
        counts: dict[str, int] = {}
        for words in self.unknown:
            for w in set(words):
                counts[w] = counts.get(w, 0) + 1
        return dict(sorted(counts.items()))


def class_factors(class_names: list[str]) -> ConditionFactors:
    """A class-conditional run: one factor, and condition c asks for class c."""
    return ConditionFactors(("class",), (tuple(class_names),), np.arange(len(class_names), dtype=np.int64)[:, None])


def asked_accuracy(pred: np.ndarray, want: np.ndarray) -> float | None:
    """The share of images whose predicted value (pred, int64 [n]) is the one their condition asks for (want,
    int64 [n], UNASKED where it names none); None when no image's condition names one."""
    asked = want != UNASKED
    return float((pred[asked] == want[asked]).mean()) if asked.any() else None


@dataclass(frozen=True)
class FactorAccuracy:
    """How often generated images show what their conditions asked for, factor by factor."""

    per_factor: dict[str, float]  # over the images whose condition asks for a value of the factor
    per_value: dict[str, dict[str, float]]  # factor -> value -> accuracy on the images asked for that value
    images: dict[str, int]  # factor -> images that were asked for one of its values


def factor_accuracy(asked: ConditionFactors, conditions: np.ndarray, pred: np.ndarray) -> FactorAccuracy:
    """conditions: int64 [N] each image's condition; pred: int64 [N, F] the judge's value codes."""
    want = asked.codes[conditions]  # [N, F]
    per_factor, per_value, images = {}, {}, {}
    for j, name in enumerate(asked.names):
        scored = want[:, j] != UNASKED  # [N]
        images[name] = int(scored.sum())
        hit = pred[:, j] == want[:, j]  # [N]
        per_factor[name] = float(hit[scored].mean()) if scored.any() else float("nan")
        per_value[name] = {v: float(hit[want[:, j] == i].mean()) for i, v in enumerate(asked.values[j])
                           if (want[:, j] == i).any()}
    return FactorAccuracy(per_factor, per_value, images)
