"""The map step of the feature pass: statistics of some chunks of one diffusion step, mergeable exactly.

A chunk is one diffusion step of a block of samples (one Zarr chunk). ``step_partial`` encodes some
chunks of one step and returns a ``StepPartial``: fire counts and activation sums by class, maxima, a
histogram and the top images per latent (``chunk_partial``: one chunk). Partials of the same step merge
exactly (sums, maxima, a top-N merge), so any scheduler may reduce them in any order and get the same
numbers. A text site's chunks carry a mask of their valid positions: padding is never encoded, and the
partial also counts where each latent fired by (condition, text position) (``PositionStats``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from tide_core.features.encode import chunk_encoder, count_chunk, fired_latents
from tide_core.features.positions import PositionKey, PositionStats
from tide_core.kernels import FeatureCounts, TopLists, count_fired, merge_top, top_images


@dataclass
class StepPartial:
    """Statistics of one SAE over some of the tokens of one diffusion step (mergeable)."""

    step: int
    tokens: int
    class_tokens: np.ndarray  # int64 [C] tokens seen per class
    fires: np.ndarray  # int64 [C, n] tokens where the latent fired, by class
    act_sum: np.ndarray  # float64 [C, n] sum of activations where it fired, by class
    act_max: np.ndarray  # float32 [n]
    hist: np.ndarray  # int64 [n, B] counts of firing activations per HIST_EDGES bin
    top_val: np.ndarray  # float32 [n, N] image activations, descending (EMPTY = unfilled)
    top_sid: np.ndarray  # int64 [n, N] their sample ids
    positions: PositionStats | None = None  # a text site's firing by (condition, text position)

    def merge(self, other: StepPartial) -> StepPartial:
        if other.step != self.step:
            raise ValueError(f"cannot merge statistics of step {other.step} into step {self.step}")
        top = merge_top(TopLists(self.top_val, self.top_sid), TopLists(other.top_val, other.top_sid))
        return StepPartial(
            step=self.step, tokens=self.tokens + other.tokens, class_tokens=self.class_tokens + other.class_tokens,
            fires=self.fires + other.fires, act_sum=self.act_sum + other.act_sum,
            act_max=np.maximum(self.act_max, other.act_max), hist=self.hist + other.hist, top_val=top.values,
            top_sid=top.sample_ids,
            positions=None if self.positions is None else self.positions.merge(other.positions))


@dataclass(frozen=True)
class Chunk:
    """The stored activations of some images at one step (a Zarr chunk)."""

    acts: np.ndarray  # [b, P, d] float16 or float32
    sample_ids: np.ndarray  # int64 [b]
    class_ids: np.ndarray  # int64 [b]
    valid: np.ndarray | None = None  # bool [b, P] a text site's positions holding a prompt token (None: all)


def step_partial(sae, chunks: Iterable[Chunk], n_images: int, step: int, timestep: int, n_classes: int,
                 top_n: int) -> StepPartial:
    """Statistics of some chunks of one step, n_images images in all, counted into one set of arrays (no
    per-chunk partials to merge); chunks may be a generator, so only one is in memory at a time."""
    n = sae.spec.n_latents
    counts = FeatureCounts.zeros(n_classes, n, n_images)
    sample_ids = np.full(n_images, -1, np.int64)
    sample_class = np.zeros(n_images, np.int64)
    class_tokens = np.zeros(n_classes, np.int64)
    enc = chunk_encoder(sae, timestep)
    s0 = tokens = 0
    positions = None
    for chunk in chunks:
        if chunk.valid is not None:
            positions = positions or PositionStats.empty()
            b = len(chunk.sample_ids)
            sample_ids[s0:s0 + b], sample_class[s0:s0 + b] = chunk.sample_ids, chunk.class_ids
            counted, found = _count_valid(sae, chunk, s0, timestep, counts, sample_class)
            class_tokens += np.bincount(chunk.class_ids, weights=chunk.valid.sum(1), minlength=n_classes).astype(np.int64)
            positions = positions.merge(found)
            s0, tokens = s0 + b, tokens + counted
            continue
        b, p, d = chunk.acts.shape
        if s0 + b > n_images:
            raise ValueError(f"step_partial was told of {n_images} images but got more")
        sample_ids[s0:s0 + b], sample_class[s0:s0 + b] = chunk.sample_ids, chunk.class_ids
        acts = chunk.acts.reshape(b * p, d)
        done = count_chunk(enc, acts, p, s0, sample_class, counts) if enc is not None else 0
        if done < b * p:  # relu SAEs, rows with a NaN: the general path for the rest of the chunk
            x = torch.from_numpy(np.ascontiguousarray(acts[done:])).float()  # [rows, d]
            f = fired_latents(sae, x, timestep)
            count_fired(counts, f.rows.numpy() + done, f.latents.numpy(), f.values.numpy(), p, s0,
                        sample_class)
        class_tokens += np.bincount(chunk.class_ids, minlength=n_classes) * p
        s0, tokens = s0 + b, tokens + b * p
    if s0 != n_images:
        raise ValueError(f"step_partial was told of {n_images} images but got {s0}")
    top = top_images(counts.per_image, sample_ids, top_n)
    return StepPartial(step=step, tokens=tokens, class_tokens=class_tokens, fires=counts.fires,
                       act_sum=counts.act_sum, act_max=counts.per_image.max(1), hist=counts.hist,
                       top_val=top.values, top_sid=top.sample_ids, positions=positions)


def _count_valid(sae, chunk: Chunk, s0: int, timestep: int, counts, sample_class: np.ndarray
                 ) -> tuple[int, PositionStats]:
    """Count a text chunk's valid positions only (the SAE's own encode on those rows), and where each latent
    fired by (condition, position). Returns (tokens counted, their PositionStats)."""
    b, p, d = chunk.acts.shape
    rows = np.flatnonzero(chunk.valid.reshape(-1))  # [r] rows of the chunk's [b*P] tokens that count
    x = torch.from_numpy(np.ascontiguousarray(chunk.acts.reshape(b * p, d)[rows])).float()  # [r, d]
    f = fired_latents(sae, x, timestep)
    at = rows[f.rows.numpy()]  # [m] each candidate's row in the chunk
    values, latents = f.values.numpy(), f.latents.numpy()
    count_fired(counts, at, latents, values, p, s0, sample_class)  # row // P is the image, as for image sites
    fired = values > 0
    image, position = np.divmod(at[fired], p)
    keys = PositionKey(p, sae.spec.n_latents).pack(chunk.class_ids[image], position, latents[fired])
    return len(rows), PositionStats.of(keys, values[fired])


def chunk_partial(sae, acts: np.ndarray, step: int, timestep: int, sample_ids: np.ndarray,
                  class_ids: np.ndarray, n_classes: int, top_n: int) -> StepPartial:
    """Statistics of one chunk: acts [b, P, d] of samples sample_ids [b] (classes class_ids [b]) at one step."""
    chunk = Chunk(acts, np.asarray(sample_ids, np.int64), np.asarray(class_ids, np.int64))
    return step_partial(sae, [chunk], len(chunk.sample_ids), step, timestep, n_classes, top_n)


def tree_reduce(items: list, combine):
    """combine(a, b) over items as a balanced binary tree (what a scheduler runs in parallel)."""
    while len(items) > 1:
        items = [combine(items[i], items[i + 1]) if i + 1 < len(items) else items[i]
                 for i in range(0, len(items), 2)]
    return items[0]


def merge_all(parts: list[StepPartial]) -> StepPartial:
    """Merge partials of one step pairwise."""
    return tree_reduce(parts, StepPartial.merge)
