"""Shuffled token batches for SAE training, read from one activation array a block of samples at a time.

``ActivationStore.iter_token_batches`` checks its arguments and calls ``shuffled_token_batches``; the SAE
stage also calls it on a source that samples the activations again instead of reading them (``TokenSource``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

BlockOrder = Literal["samples", "shards"]


class TokenSource(Protocol):
    """What the batches are read from: a Zarr activation array [S, N, P, D], or anything that answers the same
    orthogonal selection (step axes, sorted sample ids) -> [s, b, P, D]."""

    shape: tuple[int, ...]

    def get_orthogonal_selection(self, selection: tuple[np.ndarray, np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class StoreTokenBatch:
    """A shuffled batch of stored tokens."""

    acts: np.ndarray  # float32 [B, D]
    steps: np.ndarray  # int64 [B] schedule position
    timesteps: np.ndarray  # int64 [B] scheduler timestep value
    sample_ids: np.ndarray  # int64 [B]


def epoch_blocks(rng: np.random.Generator, sample_ids: np.ndarray, block: int,
                 order: BlockOrder) -> list[np.ndarray]:
    """The blocks of one epoch, in the order they are read, each a sorted array of sample ids.

    ``samples``: the samples in a fresh random order, ``block`` at a time (a block mixes shards).
    ``shards``: the shards (``block`` = the shard size) in a fresh random order, one shard's samples a block;
    what a source that samples whole shards again reads cheaply."""
    if order == "samples":
        perm = rng.permutation(sample_ids)
        return [np.sort(perm[i:i + block]) for i in range(0, len(perm), block)]
    shard_of = sample_ids // block
    return [np.sort(sample_ids[shard_of == s]) for s in rng.permutation(np.unique(shard_of))]


def shuffled_token_batches(source: TokenSource, axes: np.ndarray, sample_ids: np.ndarray, *, steps: np.ndarray,
                           timesteps: np.ndarray, batch_size: int, seed: int, epochs: int, block: int,
                           drop_last: bool, order: BlockOrder = "samples", start: int = 0,
                           valid: np.ndarray | None = None) -> Iterator[StoreTokenBatch]:
    """Batches of the tokens of ``source`` [S, N, P, D] at step axes ``axes`` and samples ``sample_ids``.

    ``steps`` and ``timesteps`` give the schedule position and timestep value of every step axis.
    Each epoch visits the samples a block at a time (``epoch_blocks``) over all the chosen steps, shuffles
    that block's tokens and yields batches; tokens carry over into the next block, and drop_last=False yields
    the final short batch. The token stream is the same for any ``start``: it begins at token ``start``,
    batches end where they would without it, and blocks wholly before ``start`` are never read (their
    shuffles are drawn all the same, so the random stream after them is unchanged).

    ``valid`` (bool [N, P], by sample id; a text site's mask) keeps only the positions it marks: padding never
    enters the stream, nor its count of tokens. None keeps every token.
    """
    d_model, per_sample = source.shape[-1], len(axes) * source.shape[2]
    rng = np.random.default_rng(seed)
    pos = 0  # tokens of the stream before the current block
    carry: list[np.ndarray] = []
    carry_meta: list[np.ndarray] = []
    # the first batch is cut short so that every later one ends on a multiple of batch_size, as without start
    want = batch_size - start % batch_size
    for _ in range(epochs):
        for ids in epoch_blocks(rng, np.asarray(sample_ids), block, order):
            keep = None if valid is None else valid[ids]  # [b, P]
            n = len(ids) * per_sample if keep is None else len(axes) * int(keep.sum())
            if pos + n <= start:  # consumed already: draw its shuffle, leave its tokens unread
                rng.permutation(n)
                pos += n
                continue
            x = source.get_orthogonal_selection((axes, ids))  # [s, b, P, D]
            s_idx = np.broadcast_to(axes[:, None, None], x.shape[:3])
            sid = np.broadcast_to(ids[None, :, None], x.shape[:3])
            flat = x.reshape(-1, d_model)  # [s*b*P, D]
            meta = np.stack([s_idx.reshape(-1), sid.reshape(-1)], 1)  # [s*b*P, 2]
            if keep is not None:
                rows = np.broadcast_to(keep[None], x.shape[:3]).reshape(-1)  # [s*b*P]
                flat, meta = flat[rows], meta[rows]  # [n, D], [n, 2]
            perm = rng.permutation(len(flat))
            skip = max(0, start - pos)
            pos += n
            carry.append(flat[perm][skip:])
            carry_meta.append(meta[perm][skip:])
            pool = np.concatenate(carry)
            pool_meta = np.concatenate(carry_meta)
            done = 0
            while len(pool) - done >= want:
                sl = slice(done, done + want)
                m = pool_meta[sl]
                yield StoreTokenBatch(acts=pool[sl].astype(np.float32), steps=steps[m[:, 0]],
                                      timesteps=timesteps[m[:, 0]], sample_ids=m[:, 1])
                done, want = done + want, batch_size
            carry, carry_meta = [pool[done:]], [pool_meta[done:]]
    if not carry:
        return
    rest, rest_meta = np.concatenate(carry), np.concatenate(carry_meta)
    if len(rest) and not drop_last:
        yield StoreTokenBatch(acts=rest.astype(np.float32), steps=steps[rest_meta[:, 0]],
                              timesteps=timesteps[rest_meta[:, 0]], sample_ids=rest_meta[:, 1])
