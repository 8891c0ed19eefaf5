"""Statistics of a text site's latents per prompt token: where each latent fired, by (condition, text position),
summed over images and steps.

Sparse: only the (condition, position, latent) triples that fired are kept, as sorted integer keys, so a wide
SAE over long prompts costs what fired, not conditions x positions x latents. Partials merge exactly (sums and
maxima by key), in any order, like ``StepPartial``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PositionKey:
    """How a key packs (condition, position, latent): ((condition * positions) + position) * latents + latent."""

    positions: int  # L, the text sequence's length
    latents: int  # n

    def pack(self, condition: np.ndarray, position: np.ndarray, latent: np.ndarray) -> np.ndarray:
        return (condition.astype(np.int64) * self.positions + position) * self.latents + latent

    def unpack(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(condition, position, latent) [m] each."""
        cell, latent = np.divmod(keys, self.latents)
        condition, position = np.divmod(cell, self.positions)
        return condition, position, latent


@dataclass(frozen=True)
class PositionStats:
    """A latent's firing at a (condition, text position), over the images and steps counted so far."""

    keys: np.ndarray  # int64 [m] sorted unique PositionKey keys
    fires: np.ndarray  # int64 [m] (image, step) pairs where the latent fired there
    act_sum: np.ndarray  # float64 [m] sum of its activations where it fired
    act_max: np.ndarray  # float32 [m]

    @classmethod
    def empty(cls) -> PositionStats:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.float32))

    @classmethod
    def of(cls, keys: np.ndarray, values: np.ndarray) -> PositionStats:
        """One firing per (key, value) pair [m] (values > 0)."""
        return _reduced(np.asarray(keys, np.int64), np.ones(len(keys), np.int64),
                        np.asarray(values, np.float64), np.asarray(values, np.float32))

    def merge(self, other: PositionStats) -> PositionStats:
        return _reduced(np.concatenate([self.keys, other.keys]), np.concatenate([self.fires, other.fires]),
                        np.concatenate([self.act_sum, other.act_sum]), np.concatenate([self.act_max, other.act_max]))


def _reduced(keys: np.ndarray, fires: np.ndarray, act_sum: np.ndarray, act_max: np.ndarray) -> PositionStats:
    """Sums and maxima of equal keys."""
    if len(keys) == 0:
        return PositionStats.empty()
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])  # first index of every distinct key
    return PositionStats(keys[starts], np.add.reduceat(fires[order], starts),
                         np.add.reduceat(act_sum[order], starts), np.maximum.reduceat(act_max[order], starts))
