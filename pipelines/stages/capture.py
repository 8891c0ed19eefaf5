"""Capture stage: the store's layout and provenance, one shard sampled with capture into it, and full token
grids recomputed for stores that kept a subset of tokens.

The glue between tide_core (model, sampler, hooks) and storage (the Zarr store and its writer thread).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pipelines.context import RunContext
from pipelines.project import code_version, content_key
from storage import ActivationStore, BackgroundWriter, ShardStats, StoreLayout
from tide_core.capture import ActivationCapture, CapturedStep, CaptureSpec, validate_spec
from tide_core.config import TideConfig
from tide_core.models.base import DiTAdapter
from tide_core.prompts import PromptSet
from tide_core.sampling import Sampler, condition_for, to_uint8


@dataclass(frozen=True)
class CapturePlan:
    """Everything a shard writer needs, derived once from the config and the loaded model."""

    sampler: Sampler
    spec: CaptureSpec
    layout: StoreLayout
    conditions: list[int]  # condition indices assigned round-robin by sample id
    batch_size: int
    provenance: dict

    @property
    def model(self) -> DiTAdapter:
        return self.sampler.model

    def conditions_of(self, sample_ids) -> list[int]:
        return [condition_for(int(i), self.conditions) for i in sample_ids]


def run_id_of(provenance: dict) -> str:
    """A run's id: hash of what determines its data (model, sampling, capture), not when it ran."""
    return content_key({k: v for k, v in provenance.items() if k not in ("code_version", "created_at", "run_id")})


def make_plan(ctx: RunContext) -> CapturePlan:
    """The capture plan of the configured model (loaded once per process), validated before any sampling."""
    return plan_for(ctx.config, ctx.model, ctx.sampler(), ctx.prompts)


def plan_for(cfg: TideConfig, model: DiTAdapter, sampler: Sampler, prompts: PromptSet | None = None) -> CapturePlan:
    """Validate capture against a loaded model and derive the store layout and provenance (the prompts of a
    text-conditional run are part of it: they are its conditions)."""
    s, c = cfg.sampling, cfg.capture
    steps = sorted(c.steps) if c.steps is not None else list(range(s.num_steps))
    spec = CaptureSpec(layers=tuple(c.layers), sites=tuple(c.sites), steps=frozenset(steps),
                       token_fraction=c.token_fraction, branch=c.branch, dtype=c.dtype, seed=s.seed)
    validate_spec(spec, model.num_layers, model.sites, s.num_steps)
    for layer in spec.layers:
        for site in spec.sites:
            model.check_site(layer, site)  # a site some blocks lack (SD3's last joint block: no text stream)
    n_cond = len(model.condition_names)
    conditions = list(s.classes) if s.classes is not None else list(range(n_cond))
    bad = [k for k in conditions if not 0 <= k < n_cond]
    if bad:
        raise ValueError(f"sampling.classes contains {bad}: the model has classes 0..{n_cond - 1}")
    grid = model.token_grid
    layout = StoreLayout(
        num_samples=s.num_samples, shard_size=s.shard_size, steps=steps, layers=sorted(c.layers),
        sites=list(c.sites), tokens_total=grid.tokens, tokens_stored=spec.tokens_stored(grid.tokens),
        token_grid=[grid.h, grid.w], d_model=model.hidden_size, image_shape=list(model.image_shape),
        dtype=c.dtype, compression=c.compression, acts_from_shard=cfg.first_act_shard(),
        text_tokens={site: model.text_length for site in c.sites if site in model.text_sites},
    )
    timesteps = sampler.timesteps()
    provenance = {
        # model.source as configured ("digits", a hub id), not where the weights lie: the run id must not
        # depend on the checkout's location; config_hash identifies the weights
        "model": {**model.provenance(), "source": cfg.model.source,
                  "time": {"kind": model.time.kind, "num_train_timesteps": model.time.num_train_timesteps}},
        "class_names": model.condition_names,
        # classes: the condition indices (class ids, or prompt positions), assigned round-robin by sample id
        "sampling": {**sampler.provenance(), "classes": conditions, "class_rule": "classes[sample_id % len]"},
        "capture": {"layers": layout.layers, "sites": layout.sites, "branch": c.branch,
                    "token_fraction": c.token_fraction,
                    "token_rule": "blake2b('{seed}:{sample_id}:{step}:tokens') -> sorted choice",
                    "dtype": c.dtype},
        "capture_timesteps": [int(timesteps[i]) for i in steps],
        "code_version": code_version(),
    }
    if model.time.kind == "flow":  # the model's own time value of each captured step, exactly
        sigmas = sampler.sigmas()
        provenance["capture_sigmas"] = [sigmas[i] for i in steps]
    if prompts is not None:
        provenance["prompts"] = [{"prompt_id": p.prompt_id, "text": p.text, "tags": list(p.tags)}
                                 for p in prompts.prompts]
        provenance["sampling"]["negative_prompt"] = cfg.sampling.negative_prompt
    provenance["run_id"] = run_id_of(provenance)
    return CapturePlan(sampler=sampler, spec=spec, layout=layout, conditions=conditions,
                       batch_size=s.batch_size, provenance=provenance)


def store_version(store: ActivationStore) -> str:
    """What identifies a store's data: its run (config) and when it was created (a re-capture under the
    same config is another store)."""
    p = store.provenance
    return f"{p['run_id']}@{p.get('created_at', '')}"


def create_store(ctx: RunContext, overwrite: bool = False) -> ActivationStore:
    """Create the store's arrays (or check that an existing one matches the config) before any shard runs."""
    plan = make_plan(ctx)
    return ActivationStore.create(ctx.project.store_url, plan.layout, plan.provenance, overwrite=overwrite)


@dataclass(frozen=True)
class ShardReport:
    stats: ShardStats
    stored_bytes: int
    images: np.ndarray  # uint8 [n, H, W, C]
    store_version: str
    reused: bool  # the shard was complete already (its done marker): nothing was sampled

    @property
    def compression_ratio(self) -> float:
        return self.stats.raw_bytes / max(1, self.stored_bytes)


def write_shard(ctx: RunContext, shard: int) -> ShardReport:
    """Sample one shard with capture on into the store (which must match the config). A shard with its done
    marker is complete (the marker is written last) and is not sampled again, even when the run that wrote
    it was killed before Dagster recorded it; `tide run --overwrite` starts the store afresh."""
    plan = make_plan(ctx)
    store = ActivationStore.open(ctx.project.store_url)
    store.check_matches(plan.layout, plan.provenance)
    reused = store.is_done(shard)
    if reused:
        ctx.log(f"shard {shard} is complete in the store (done marker): not sampled again")
        stats = ShardStats(**{k: v for k, v in store.shard_stats(shard).items() if k in ShardStats.__dataclass_fields__})
    else:
        stats = capture_shard(store, plan, shard)
    rng = store.layout.shard_range(shard)
    return ShardReport(stats=stats, stored_bytes=store.shard_stored_bytes(shard),
                       images=store.images(rng.start, rng.stop), store_version=store_version(store), reused=reused)


def capture_shard(store: ActivationStore, plan: CapturePlan, shard: int) -> ShardStats:
    """Sample one shard with capture on and write it; the done marker is written last.

    When a batch covers the whole shard, each step is handed to the writer thread as soon as it is
    computed, so compression and I/O overlap the next step. Smaller batches fill a shard buffer and
    the step is written once its last batch has passed it. A shard before ``layout.acts_from_shard`` (a
    training shard of a streaming run) is sampled without hooks: only its images, classes and seeds are kept.
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
            if shard < plan.layout.acts_from_shard:
                out = plan.sampler.sample(batch_ids, plan.conditions_of(batch_ids))
            else:
                capture = ActivationCapture(plan.model, plan.spec, sink)
                capture.set_samples(batch_ids)
                with capture:
                    out = plan.sampler.sample(batch_ids, plan.conditions_of(batch_ids), observer=capture)
            images.append(to_uint8(out.images))
            seeds.append(out.seeds)
        conditions = np.array(plan.conditions_of(ids))
        writer.submit(store.write_samples, shard, np.concatenate(images), conditions, np.concatenate(seeds))
        for site in plan.layout.text_tokens:  # the captured (conditional) half's text: the sample's own prompt
            writer.submit(store.write_token_mask, shard, site, plan.model.text_mask(conditions))
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
    acts = {(site, layer): np.empty((n, lay.tokens_of(site), lay.d_model), lay.dtype)
            for site in lay.sites for layer in lay.layers}
    return {"acts": acts, "index": np.empty((n, lay.tokens_stored), np.int16)}


def recapture_full_grid(plan: CapturePlan, layer: int, site: str,
                        requests: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Every token of some (step, sample) pairs, recomputed by sampling those samples again.

    For stores captured with token_fraction < 1: a sample's noise and condition follow from its id (the
    provenance's seed and condition rule), so re-running the sampler reproduces its trajectory exactly up
    to float summation order (batch composition). ``requests`` maps a step to the sample ids wanted there;
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

        capture = ActivationCapture(plan.model, spec, keep)
        capture.set_samples(batch)
        with capture:
            plan.sampler.sample(batch, plan.conditions_of(batch), observer=capture)
    return out
