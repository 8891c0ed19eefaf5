"""Token batches: the unit every SAE stage reads (training, evaluation), and the stream helpers that make
results depend only on the token order, never on how a source chunks it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TokenBatch:
    """Tokens of one or more images at one or more sampling steps."""

    acts: torch.Tensor | np.ndarray  # [B, d_in] float activations
    timesteps: torch.Tensor | np.ndarray  # [B] int: diffusion timestep of each token (what TIDE conditions on)
    steps: torch.Tensor | np.ndarray  # [B] int: sampling step index of each token (0 = noisiest)

    def __post_init__(self) -> None:
        n = len(self.acts)
        if np.ndim(self.acts) != 2:
            raise ValueError(f"TokenBatch.acts must be [tokens, d_in]; got shape {tuple(self.acts.shape)}")
        if len(self.timesteps) != n or len(self.steps) != n:
            raise ValueError(
                f"TokenBatch has {n} activation rows but {len(self.timesteps)} timesteps and "
                f"{len(self.steps)} steps: all three must have one entry per token"
            )

    def __len__(self) -> int:
        return len(self.acts)

    @staticmethod
    def coerce(batch: object) -> TokenBatch:
        """Any batch with ``.acts``, ``.timesteps`` and ``.steps`` (e.g. the activation store's) as a TokenBatch."""
        if isinstance(batch, TokenBatch):
            return batch
        try:
            return TokenBatch(batch.acts, batch.timesteps, batch.steps)
        except AttributeError:
            raise TypeError(
                f"expected token batches with .acts, .timesteps and .steps; got {type(batch).__name__}"
            ) from None

    def to_torch(self, device: str | torch.device = "cpu") -> TokenBatch:
        """float32 activations and int64 timesteps / steps on ``device``."""
        return TokenBatch(
            acts=torch.as_tensor(self.acts).to(device=device, dtype=torch.float32),
            timesteps=torch.as_tensor(self.timesteps).to(device=device, dtype=torch.int64),
            steps=torch.as_tensor(self.steps).to(device=device, dtype=torch.int64),
        )

    def slice(self, start: int, stop: int) -> TokenBatch:
        return TokenBatch(self.acts[start:stop], self.timesteps[start:stop], self.steps[start:stop])

    @staticmethod
    def concat(batches: list[TokenBatch]) -> TokenBatch:
        if len(batches) == 1:
            return batches[0]
        parts = [b.to_torch() for b in batches]
        return TokenBatch(
            torch.cat([b.acts for b in parts]),
            torch.cat([b.timesteps for b in parts]),
            torch.cat([b.steps for b in parts]),
        )


def rebatch(batches: Iterable[TokenBatch], batch_size: int) -> Iterator[TokenBatch]:
    """Re-cut a stream into batches of exactly ``batch_size`` tokens (the last one may be shorter)."""
    pending: list[TokenBatch] = []
    n_pending = 0
    for batch in map(TokenBatch.coerce, batches):
        start = 0
        while start < len(batch):
            take = min(batch_size - n_pending, len(batch) - start)
            pending.append(batch.slice(start, start + take))
            n_pending += take
            start += take
            if n_pending == batch_size:
                yield TokenBatch.concat(pending)
                pending, n_pending = [], 0
    if n_pending:
        yield TokenBatch.concat(pending)


def skip_tokens(batches: Iterable[TokenBatch], n_tokens: int) -> Iterator[TokenBatch]:
    """The stream without its first ``n_tokens`` tokens (for sources that cannot seek, on resume)."""
    to_skip = n_tokens
    for batch in map(TokenBatch.coerce, batches):
        if to_skip >= len(batch):
            to_skip -= len(batch)
            continue
        yield batch.slice(to_skip, len(batch)) if to_skip else batch
        to_skip = 0
