"""The shapes of an activation store (``StoreLayout``: everything needed to create its arrays) and what
writing one shard cost (``ShardStats``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from storage.errors import StoreError


@dataclass(frozen=True)
class StoreLayout:
    """Shapes of a store: everything needed to create its arrays."""

    num_samples: int
    shard_size: int
    steps: list[int]  # captured schedule positions (axis 0 of every activation array)
    layers: list[int]
    sites: list[str]
    tokens_total: int  # T: image tokens per image (grid_h * grid_w)
    tokens_stored: int  # P: tokens stored per image and step (T when not subsampled)
    token_grid: list[int]  # [grid_h, grid_w]
    d_model: int
    image_shape: list[int]  # [H, W, C]
    dtype: str = "float16"
    compression: str = "none"  # none | lz4 | zstd (blosc, byte shuffle)
    # Activations are stored from this shard on; the shards before it have none (streaming SAE training
    # samples them again where it needs them, so a run's bulk is its held-out shards only).
    acts_from_shard: int = 0
    # Sites in a text stream: site -> L, positions of the text sequence per sample (their token axis, in place
    # of the image tokens); every position stored, with a per-sample mask of those holding a prompt token.
    text_tokens: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.shard_size < 1:
            raise StoreError("num_samples and shard_size must be >= 1")
        if not 0 <= self.acts_from_shard < self.num_shards:
            raise StoreError(f"acts_from_shard={self.acts_from_shard} must be in 0..{self.num_shards - 1}: "
                             "at least the last shard holds activations")
        if not 1 <= self.tokens_stored <= self.tokens_total:
            raise StoreError(f"tokens_stored={self.tokens_stored} must be in 1..{self.tokens_total}")
        unknown = sorted(set(self.text_tokens) - set(self.sites))
        if unknown or any(n < 1 for n in self.text_tokens.values()):
            raise StoreError(f"text_tokens={self.text_tokens}: every text site must be one of sites {self.sites} "
                             "with at least one position")
        if self.dtype not in ("float16", "float32"):
            raise StoreError(f"dtype={self.dtype!r}: use float16 or float32 (bfloat16 is not a numpy dtype)")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    @property
    def subsampled(self) -> bool:
        return self.tokens_stored < self.tokens_total

    def attrs(self) -> dict:
        """The layout as the store's zarr.json keeps it: ``text_tokens`` only when there are text sites, so a
        store of image sites has the attributes it had before text sites existed."""
        out = asdict(self)
        if not self.text_tokens:
            del out["text_tokens"]
        return out

    def is_text(self, site: str) -> bool:
        return site in self.text_tokens

    def tokens_of(self, site: str) -> int:
        """P of a site's arrays: L for a text site, else the image tokens stored."""
        return self.text_tokens.get(site, self.tokens_stored)

    @property
    def act_samples(self) -> range:
        """The samples whose activations the store holds (all of them unless ``acts_from_shard > 0``)."""
        return range(self.acts_from_shard * self.shard_size, self.num_samples)

    def shard_range(self, shard: int) -> range:
        if not 0 <= shard < self.num_shards:
            raise StoreError(f"shard {shard} out of range: the store has shards 0..{self.num_shards - 1}")
        return range(shard * self.shard_size, min(self.num_samples, (shard + 1) * self.shard_size))

    def step_axis(self, step: int) -> int:
        try:
            return self.steps.index(step)
        except ValueError:
            raise StoreError(f"step {step} was not captured; captured steps: {_ranges(self.steps)}") from None

    def act_bytes_per_sample(self) -> int:
        itemsize = np.dtype(self.dtype).itemsize
        per_site = sum(len(self.steps) * self.tokens_of(site) * self.d_model * itemsize for site in self.sites)
        return per_site * len(self.layers)


@dataclass
class ShardStats:
    """What writing one shard cost."""

    shard: int
    samples: int
    raw_bytes: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _ranges(xs: Sequence[int]) -> str:
    xs = list(xs)
    if xs and xs == list(range(xs[0], xs[-1] + 1)):
        return f"{xs[0]}..{xs[-1]}"
    return str(xs)
