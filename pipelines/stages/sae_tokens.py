"""Where the SAE stage reads the tokens of one (layer, site): the activation store, or, for a streaming run
(`sae.stream`), the sampler for the training samples, whose activations the store does not keep.

Both give the same token stream (``storage.token_batches``): the store's array and ``SampledActivations``
answer the same selection (step axes, sample ids) -> [s, b, P, D] in the store's dtype. Sampled again in the
batches capture used, a shard's activations are the bits capture would have stored (a sample depends only
on its seed and id; the forward pass only on its batch), so streaming training equals training from a full
store with the same block order, to the bit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from pipelines.context import RunContext
from pipelines.stages.capture import CapturePlan, make_plan
from storage import ActivationStore, BlockOrder, StoreError, StoreTokenBatch, shuffled_token_batches
from tide_core.capture import ActivationCapture, CapturedStep, CaptureSpec
from tide_core.sae import TokenBatch


class _Enough(Exception):
    """Raised from the capture sink after the last captured step: the rest of the schedule and the decoder
    would change nothing that is kept."""


@dataclass
class SampledActivations:
    """The activations of one (layer, site) as the store would hold them, sampled again on request."""

    plan: CapturePlan
    layer: int
    site: str
    samples_drawn: int = field(default=0, init=False)  # samples sampled so far (the cost of streaming)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        lay = self.plan.layout
        return len(lay.steps), lay.num_samples, lay.tokens_of(self.site), lay.d_model

    def get_orthogonal_selection(self, selection: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """(step axes, sorted sample ids) -> [s, b, P, D] in the store's dtype, as ``zarr.Array`` answers it."""
        axes, ids = (np.asarray(x) for x in selection)
        lay = self.plan.layout
        out = np.empty((len(lay.steps), len(ids), lay.tokens_of(self.site), lay.d_model), lay.dtype)  # [S, b, P, D]
        row = {int(i): j for j, i in enumerate(ids)}
        for batch in self._capture_batches(ids):
            rows = [row[i] for i in batch]

            def keep(cs: CapturedStep, rows=rows) -> None:
                out[lay.step_axis(cs.step), rows] = cs.acts[(self.site, self.layer)]  # [B, P, D]
                if cs.step == lay.steps[-1]:
                    raise _Enough

            capture = ActivationCapture(self.plan.model, self._spec(), keep)
            capture.set_samples(batch)
            try:
                with capture:
                    self.plan.sampler.sample(batch, self.plan.conditions_of(batch), observer=capture)
            except _Enough:
                pass
            self.samples_drawn += len(batch)
        return out[axes]

    def _spec(self) -> CaptureSpec:
        """Capture's spec (steps, tokens, branch, dtype) on this layer and site only."""
        return replace(self.plan.spec, layers=(self.layer,), sites=(self.site,))

    def _capture_batches(self, ids: np.ndarray) -> list[list[int]]:
        """The ids grouped as capture batched them (``batch_size`` at a time from each shard's start), so each
        forward pass sees the batch it saw in capture: whole shards come back bit for bit."""
        lay, bs = self.plan.layout, self.plan.batch_size
        groups: dict[tuple[int, int], list[int]] = {}
        for i in ids.tolist():
            shard = i // lay.shard_size
            groups.setdefault((shard, (i - shard * lay.shard_size) // bs), []).append(i)
        return [groups[k] for k in sorted(groups)]


@dataclass
class TokenReader:
    """Token batches of one (layer, site), with the run's block order; training samples come from
    ``sampled`` when the store keeps no activations of theirs."""

    store: ActivationStore
    layer: int
    site: str
    order: BlockOrder = "samples"
    sampled: SampledActivations | None = None
    # sampled evaluation streams, kept in the store's dtype (exact: the values came from it), so the variants
    # of a layer are evaluated on one sampling of the training split, not one each
    _kept: dict[tuple, list[StoreTokenBatch]] = field(default_factory=dict, init=False, repr=False)

    @property
    def samples_drawn(self) -> int:
        return 0 if self.sampled is None else self.sampled.samples_drawn

    def batches(self, sample_ids: Sequence[int], batch_size: int, seed: int, epochs: int = 1,
                drop_last: bool = True, start: int = 0, limit: int | None = None) -> Iterator[StoreTokenBatch]:
        """The shuffled stream of ``sample_ids``' tokens from token ``start`` on, ending after ``limit``
        tokens (None: all of them), so that no block past the limit is read (or sampled)."""
        ids = np.asarray(sample_ids)
        if self.sampled is None or ids.min() >= self.store.layout.act_samples.start:
            stream = self.store.iter_token_batches(self.site, self.layer, batch_size, seed=seed, sample_ids=ids,
                                                   epochs=epochs, drop_last=drop_last, order=self.order, start=start)
            return _first(stream, limit)
        if limit is None:
            return self._sampled(ids, batch_size, seed, epochs, drop_last, start)
        key = (ids.tobytes(), batch_size, seed, epochs, drop_last, start, limit)
        if key not in self._kept:
            dtype = self.store.layout.dtype
            self._kept[key] = [replace(b, acts=b.acts.astype(dtype)) for b in
                               _first(self._sampled(ids, batch_size, seed, epochs, drop_last, start), limit)]
        return (replace(b, acts=b.acts.astype(np.float32)) for b in self._kept[key])

    def _sampled(self, ids: np.ndarray, batch_size: int, seed: int, epochs: int, drop_last: bool,
                 start: int) -> Iterator[StoreTokenBatch]:
        stored = self.store.layout.act_samples
        if ids.max() >= stored.start:
            raise StoreError(f"samples {ids.min()}..{ids.max()} mix sampled and stored activations (stored from "
                             f"{stored.start}): read the training and held-out samples separately")
        lay = self.store.layout
        return shuffled_token_batches(
            self.sampled, np.arange(len(lay.steps)), ids, steps=np.asarray(lay.steps, np.int64),
            timesteps=np.asarray(self.store.provenance["capture_timesteps"], np.int64), batch_size=batch_size,
            seed=seed, epochs=epochs, block=lay.shard_size, drop_last=drop_last, order=self.order, start=start,
            valid=self.store.valid_positions(self.site))


def _first(batches: Iterable[StoreTokenBatch], limit: int | None) -> Iterator[StoreTokenBatch]:
    """The first ``limit`` tokens of a stream, pulling nothing after them."""
    left = limit
    for b in batches:
        if left is not None and len(b.sample_ids) >= left:
            yield b if len(b.sample_ids) == left else StoreTokenBatch(
                acts=b.acts[:left], steps=b.steps[:left], timesteps=b.timesteps[:left], sample_ids=b.sample_ids[:left])
            return
        if left is not None:
            left -= len(b.sample_ids)
        yield b


class ResumableStream:
    """One token stream that training pauses (at each checkpoint) and continues without reading anything
    twice: ``at(start)`` replays the few tokens the trainer pulled but did not use (``keep`` covers them: the
    trainer's re-batching and its last cut batch, under two batches), then continues the open source. A start
    outside what it holds opens the source again there (``open_at``)."""

    def __init__(self, open_at: Callable[[int], Iterator[StoreTokenBatch]], keep: int):
        self._open_at, self._keep = open_at, keep
        self._source: Iterator[StoreTokenBatch] | None = None
        self._end = 0  # stream position after the last batch pulled from the source
        self._recent: deque[tuple[int, TokenBatch]] = deque()  # (first token, batch), the last ``keep`` tokens

    def at(self, start: int) -> Iterator[TokenBatch]:
        first = self._recent[0][0] if self._recent else self._end
        if self._source is None or not first <= start <= self._end:
            self._source, self._end = self._open_at(start), start
            self._recent.clear()
        return self._from(start)

    def _from(self, start: int) -> Iterator[TokenBatch]:
        for first, b in list(self._recent):
            if first + len(b) > start:
                yield b.slice(max(0, start - first), len(b))
        for raw in self._source:
            b = TokenBatch.coerce(raw)
            self._recent.append((self._end, b))
            self._end += len(b)
            while self._recent[0][0] + len(self._recent[0][1]) <= self._end - self._keep:
                self._recent.popleft()
            yield b


def token_reader(ctx: RunContext, store: ActivationStore, layer: int, site: str) -> TokenReader:
    """The reader the config asks for. Streaming: the store must be a streaming capture of this config (its
    sampler and model are what the training samples are sampled again with), checked before any sampling."""
    cfg = ctx.config.sae
    if not cfg.stream:
        return TokenReader(store, layer, site, order=cfg.block_order)
    plan = make_plan(ctx)
    store.check_matches(plan.layout, plan.provenance)  # also: the store keeps activations from the same shard
    return TokenReader(store, layer, site, order=cfg.block_order, sampled=SampledActivations(plan, layer, site))
