"""Steering a DiT block with fixed directions: the diff-in-means baseline that feature edits are measured
against.

A direction for "value a -> value b" of a factor at one step is the mean block output over the images that
show b minus the mean over those that show a (every token weighed alike), from the stored activations of
that step. During a window of sampling steps the hook adds ``strength`` times each row's direction to every
token of that row, in both CFG halves (as the feature edits and the splice do) or the conditional one only,
so strength 1 moves a row's mean activation from a's to b's. A ``StepObserver``; removable; deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from tide_core.capture import BlockHook
from tide_core.edit import Branch, check_branch, edited_halves
from tide_core.models.base import DiTAdapter


def value_means(acts: np.ndarray, values: np.ndarray, n_values: int) -> np.ndarray:
    """Mean activation per factor value: acts [N, P, d] of one step, values [N] codes (< 0: unknown) ->
    float64 [n_values, d] (NaN rows for values no image shows)."""
    per_image = acts.astype(np.float64).mean(1)  # [N, d]
    out = np.full((n_values, acts.shape[2]), np.nan)
    for v in range(n_values):
        rows = values == v
        if rows.any():
            out[v] = per_image[rows].mean(0)
    return out


class SteerHook(BlockHook):
    """Adds strength * directions[step][row] to every token of each row of block ``layer``'s output at the
    steps ``directions`` names; ``directions[step]`` is [n_rows, D] (one direction per image of the batch).
    branch: the CFG halves steered, both (the push survives guidance as it is) or the conditional one only
    (guidance then scales the push with the prompt's)."""

    def __init__(self, model: DiTAdapter, layer: int, directions: Mapping[int, np.ndarray], strength: float,
                 branch: Branch = "both"):
        check_branch(branch)
        self.model, self.layer, self.strength, self.branch = model, layer, float(strength), branch
        self._dirs = {int(s): torch.as_tensor(np.asarray(d), dtype=torch.float32) for s, d in directions.items()}
        self._step = None
        self._guided = False

    def begin_step(self, step: int, timestep: int, batch: int, guided: bool) -> None:
        self._step, self._guided = step, guided
        if step in self._dirs and self._dirs[step].shape[0] != batch:
            raise ValueError(f"step {step}: {self._dirs[step].shape[0]} directions for a batch of {batch} images")

    def end_step(self, step: int) -> None:
        self._step = None

    def _edit(self, tokens: torch.Tensor) -> torch.Tensor | None:
        if self._step not in self._dirs:
            return None
        halves, edited = edited_halves(self.branch, self._guided)
        b, n_tok, d = tokens.shape  # [halves * n, T, D]
        delta = self.strength * self._dirs[self._step].to(tokens.device)  # [n, D]
        shifted = tokens.float().reshape(halves, b // halves, n_tok, d).clone()
        shifted[:edited] += delta[None, :, None, :]
        return shifted.reshape(b, n_tok, d).to(tokens.dtype)
