"""Shuffled token batches for SAE training, read from one activation array a block of samples at a time.

``ActivationStore.iter_token_batches`` checks its arguments and calls ``shuffled_token_batches``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import zarr


@dataclass(frozen=True)
class StoreTokenBatch:
    """A shuffled batch of stored tokens."""

    acts: np.ndarray  # float32 [B, D]
    steps: np.ndarray  # int64 [B] schedule position
    timesteps: np.ndarray  # int64 [B] scheduler timestep value
    sample_ids: np.ndarray  # int64 [B]


def shuffled_token_batches(arr: zarr.Array, axes: np.ndarray, sample_ids: np.ndarray, *, steps: np.ndarray,
                           timesteps: np.ndarray, batch_size: int, seed: int, epochs: int, block: int,
                           drop_last: bool) -> Iterator[StoreTokenBatch]:
    """Batches of the tokens of ``arr`` [S, N, P, D] at step axes ``axes`` and samples ``sample_ids``.

    ``steps`` and ``timesteps`` give the schedule position and timestep value of every step axis.
    Each epoch visits the samples in a fresh random order, ``block`` samples at a time over all the
    chosen steps, shuffles that block's tokens and yields full batches; tokens left over carry into
    the next block, and drop_last=False yields the final short batch.
    """
    d_model = arr.shape[-1]
    rng = np.random.default_rng(seed)
    carry: list[np.ndarray] = []
    carry_meta: list[np.ndarray] = []
    for _ in range(epochs):
        order = rng.permutation(sample_ids)
        for i in range(0, len(order), block):
            ids = np.sort(order[i:i + block])
            x = arr.get_orthogonal_selection((axes, ids))  # [s, b, P, D]
            s_idx = np.broadcast_to(axes[:, None, None], x.shape[:3])
            sid = np.broadcast_to(ids[None, :, None], x.shape[:3])
            flat = x.reshape(-1, d_model)  # [s*b*P, D]
            meta = np.stack([s_idx.reshape(-1), sid.reshape(-1)], 1)  # [s*b*P, 2]
            perm = rng.permutation(len(flat))
            carry.append(flat[perm])
            carry_meta.append(meta[perm])
            pool = np.concatenate(carry)
            pool_meta = np.concatenate(carry_meta)
            n_full = len(pool) // batch_size
            for j in range(n_full):
                sl = slice(j * batch_size, (j + 1) * batch_size)
                m = pool_meta[sl]
                yield StoreTokenBatch(acts=pool[sl].astype(np.float32), steps=steps[m[:, 0]],
                                      timesteps=timesteps[m[:, 0]], sample_ids=m[:, 1])
            carry, carry_meta = [pool[n_full * batch_size:]], [pool_meta[n_full * batch_size:]]
    rest, rest_meta = np.concatenate(carry), np.concatenate(carry_meta)
    if len(rest) and not drop_last:
        yield StoreTokenBatch(acts=rest.astype(np.float32), steps=steps[rest_meta[:, 0]],
                              timesteps=timesteps[rest_meta[:, 0]], sample_ids=rest_meta[:, 1])
