"""Sampling a shard with capture into the activation store: the glue between tide_core and storage.

Not a Dagster module (assets call it), so tests and benchmarks drive it directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from storage.activation_store import ActivationStore, ShardStats, StoreLayout
from storage.writer import BackgroundWriter
from tide_core.capture import ActivationCapture, CapturedStep, CaptureSpec, validate_spec
from tide_core.config import TideConfig
from tide_core.dit import DiTBundle
from tide_core.sampling import Sampler, class_for, to_uint8


@dataclass(frozen=True)
class CapturePlan:
    """Everything a shard writer needs, derived once from the config and the loaded model."""

    sampler: Sampler
    spec: CaptureSpec
    layout: StoreLayout
    classes: list[int]
    batch_size: int
    provenance: dict


def make_plan(cfg: TideConfig, bundle: DiTBundle, code_version: str = "") -> CapturePlan:
    """Validate capture against the loaded model and derive the store layout (before any sampling)."""
    s, c = cfg.sampling, cfg.capture
    sampler = Sampler(bundle, s.scheduler, s.num_steps, s.guidance_scale, s.seed)
    steps = sorted(c.steps) if c.steps is not None else list(range(s.num_steps))
    spec = CaptureSpec(layers=tuple(c.layers), sites=tuple(c.sites), steps=frozenset(steps),
                       token_fraction=c.token_fraction, branch=c.branch, dtype=c.dtype, seed=s.seed)
    validate_spec(spec, bundle.num_layers, s.num_steps)
    classes = list(s.classes) if s.classes is not None else list(range(bundle.num_classes))
    bad = [k for k in classes if not 0 <= k < bundle.num_classes]
    if bad:
        raise ValueError(f"sampling.classes contains {bad}: the model has classes 0..{bundle.num_classes - 1}")
    gh, gw = bundle.token_grid
    total = gh * gw
    side = bundle.sample_size * (8 if bundle.vae is not None else 1)
    channels = 3 if bundle.vae is not None else bundle.in_channels
    layout = StoreLayout(
        num_samples=s.num_samples, shard_size=s.shard_size, steps=steps, layers=sorted(c.layers),
        sites=list(c.sites), tokens_total=total, tokens_stored=spec.tokens_stored(total),
        token_grid=[gh, gw], d_model=bundle.hidden_size, image_shape=[side, side, channels], dtype=c.dtype,
        compression=c.compression,
    )
    timesteps = sampler.timesteps()
    provenance = {
        "model": {"source": cfg.model.source, "config_hash": bundle.config_hash, "dtype": cfg.model.dtype,
                  "num_layers": bundle.num_layers, "hidden_size": bundle.hidden_size,
                  "num_classes": bundle.num_classes},
        "class_names": bundle.class_names,
        "sampling": {**sampler.provenance(), "classes": classes, "class_rule": "classes[sample_id % len]"},
        "capture": {"layers": layout.layers, "sites": layout.sites, "branch": c.branch,
                    "token_fraction": c.token_fraction,
                    "token_rule": "blake2b('{seed}:{sample_id}:{step}:tokens') -> sorted choice",
                    "dtype": c.dtype},
        "capture_timesteps": [int(timesteps[i]) for i in steps],
        "code_version": code_version,
    }
    return CapturePlan(sampler=sampler, spec=spec, layout=layout, classes=classes,
                       batch_size=s.batch_size, provenance=provenance)


def capture_shard(store: ActivationStore, plan: CapturePlan, shard: int) -> ShardStats:
    """Sample one shard with capture on and write it; the done marker is written last.

    When a batch covers the whole shard, each step is handed to the writer thread as soon as it is
    computed, so compression and I/O overlap the next step. Smaller batches fill a shard buffer and
    the step is written once its last batch has passed it.
    """
    t0 = time.perf_counter()
    ids = list(store.begin_shard(shard))
    batches = [ids[i:i + plan.batch_size] for i in range(0, len(ids), plan.batch_size)]
    images, seeds = [], []
    with BackgroundWriter(max_pending=4) as writer:
        sink = _ShardSink(store, shard, len(ids), len(batches), writer)
        for b, batch_ids in enumerate(batches):
            sink.batch = b
            sink.offset = batch_ids[0] - ids[0]
            capture = ActivationCapture(plan.sampler.bundle.transformer, plan.spec, sink)
            capture.set_samples(batch_ids)
            with capture:
                out = plan.sampler.sample(batch_ids, [class_for(i, plan.classes) for i in batch_ids],
                                          observer=capture)
            images.append(to_uint8(out.images))
            seeds.append(out.seeds)
        class_ids = np.array([class_for(i, plan.classes) for i in ids])
        writer.submit(store.write_samples, shard, np.concatenate(images), class_ids, np.concatenate(seeds))
    stats = ShardStats(shard=shard, samples=len(ids), raw_bytes=writer.stats.bytes,
                       seconds=round(time.perf_counter() - t0, 3),
                       extra={"writer_busy_seconds": round(writer.stats.busy_seconds, 3)})
    store.mark_done(shard, stats)
    return stats


class _ShardSink:
    """Receives captured steps batch by batch and hands complete (step, shard) blocks to the writer."""

    def __init__(self, store: ActivationStore, shard: int, n: int, num_batches: int, writer: BackgroundWriter):
        self.store, self.shard, self.n, self.num_batches, self.writer = store, shard, n, num_batches, writer
        self.lay = store.layout
        self.batch = 0
        self.offset = 0
        self.buffers: dict[int, dict] = {}

    def __call__(self, cs: CapturedStep) -> None:
        if self.num_batches == 1:  # the step is complete for the whole shard: write it now
            self.writer.submit(self.store.write_step, self.shard, cs.step, cs.acts, cs.token_index)
            return
        buf = self.buffers.setdefault(cs.step, _empty_step(self.lay, self.n))
        for key, a in cs.acts.items():
            buf["acts"][key][self.offset:self.offset + len(a)] = a  # [m, P, D]
        if cs.token_index is not None:
            buf["index"][self.offset:self.offset + len(cs.token_index)] = cs.token_index
        if self.batch == self.num_batches - 1:
            done = self.buffers.pop(cs.step)
            self.writer.submit(self.store.write_step, self.shard, cs.step, done["acts"],
                               done["index"] if self.lay.subsampled else None)


def _empty_step(lay: StoreLayout, n: int) -> dict:
    acts = {(site, layer): np.empty((n, lay.tokens_stored, lay.d_model), lay.dtype)
            for site in lay.sites for layer in lay.layers}
    return {"acts": acts, "index": np.empty((n, lay.tokens_stored), np.int16)}


def recapture_full_grid(plan: CapturePlan, layer: int, site: str,
                        requests: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Every token of some (step, sample) pairs, recomputed by sampling those samples again.

    For stores captured with token_fraction < 1: a sample's noise and class follow from its id (the
    provenance's seed and class rule), so re-running the sampler reproduces its trajectory exactly up to
    float summation order (batch composition). ``requests`` maps a step to the sample ids wanted there;
    returns step -> float32 [len(ids), T, D] in the order of ``requests[step]``.
    """
    steps = frozenset(int(s) for s in requests)
    spec = CaptureSpec(layers=(layer,), sites=(site,), steps=steps, token_fraction=1.0,
                       branch=plan.spec.branch, dtype="float32", seed=plan.spec.seed)
    wanted = {s: {int(i): j for j, i in enumerate(ids)} for s, ids in requests.items()}
    out = {s: np.empty((len(ids), plan.layout.tokens_total, plan.layout.d_model), np.float32)
           for s, ids in requests.items()}
    every = sorted({int(i) for ids in requests.values() for i in ids})
    for start in range(0, len(every), plan.batch_size):
        batch = every[start:start + plan.batch_size]

        def keep(cs: CapturedStep, batch=batch) -> None:
            acts = cs.acts[(site, layer)]  # [B, T, D]
            for row, sid in enumerate(batch):
                j = wanted[cs.step].get(sid)
                if j is not None:
                    out[cs.step][j] = acts[row]

        capture = ActivationCapture(plan.sampler.bundle.transformer, spec, keep)
        capture.set_samples(batch)
        with capture:
            plan.sampler.sample(batch, [class_for(i, plan.classes) for i in batch], observer=capture)
    return out
