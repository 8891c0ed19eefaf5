"""SAE sweep stage: one point of a grid of training settings (lr x batch size x k x width) on one layer and
site; every configured variant trained there from the same batches, scored per diffusion step on the
held-out samples, and published to `sae_sweep`. The sweep's SAEs are not kept: the table is the result."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipelines.context import RunContext
from pipelines.project import content_key
from pipelines.stages.sae import check_inputs, evaluate_sae, new_saes, split_samples, training_stream
from tide_core.config import SWEEP_GRID_FIELDS, SweepConfig, SweepPoint, TideConfig
from tide_core.sae import SAETrainer
from tide_core.sae.spec import BATCH_CONFIG_PATHS, batch_settings

OVERALL = -1  # sae_sweep.step of the aggregate over all diffusion steps


class SweepError(ValueError):
    """The sweep cannot run as configured; the message says what to change."""


@dataclass(frozen=True)
class PointReport:
    """What one point published."""

    sweep_id: str
    point: SweepPoint
    seconds: float
    tokens: int
    nmse: dict[str, float]  # variant -> held-out nmse over all steps


def require_sweep(cfg: TideConfig) -> SweepConfig:
    if cfg.sweep is None:
        raise SweepError("the config has no [sweep] section: add one (see `tide config --explain sweep`)")
    return cfg.sweep


def sweep_id(cfg: TideConfig, run_id: str) -> str:
    """What every point of the sweep shares: the run, site, token budget and the [sae] settings the
    grid does not vary. Adding a point to the grid keeps the id, so earlier points stay comparable."""
    require_sweep(cfg)
    fixed = cfg.section_hash("sae", "sweep", exclude=(*SWEEP_GRID_FIELDS, *BATCH_CONFIG_PATHS))
    batch = batch_settings(cfg.sae.spec)  # only when set: sweeps without batch variants keep their ids
    return "sw-" + content_key({"run_id": run_id, "fixed": fixed, **({"batch": batch} if batch else {})})[:12]


def run_point(ctx: RunContext, key: str) -> PointReport:
    """Train and score every variant at the point ``key``, then replace its rows of `sae_sweep`."""
    cfg = ctx.config
    sw = require_sweep(cfg)
    points = {p.key: p for p in sw.points(cfg.sae)}
    if key not in points:
        raise SweepError(f"{key!r} is not a point of the configured sweep: {', '.join(points)}")
    point = points[key]
    store = check_inputs(ctx, point.layer, sw.site)
    split = split_samples(store, cfg.sae.heldout_fraction)
    design = cfg.sae.spec.model_copy(update={"k": point.k, "n_latents": point.n_latents})
    train = cfg.sae.train.model_copy(update={
        "lr": point.lr, "variant_lr_scale": {}, "batch_size": point.batch_size,
        "total_tokens": sw.total_tokens,
        "warmup_tokens": min(cfg.sae.train.warmup_tokens, sw.total_tokens // 10)})
    saes = new_saes(ctx, store, point.layer, sw.site, design, cfg.sae.variants, train.seed)
    trainer = SAETrainer(saes, train)
    t0 = time.perf_counter()
    results = trainer.fit(training_stream(store, point.layer, sw.site, split, train))
    seconds = time.perf_counter() - t0
    run_id = store.provenance["run_id"]
    sid = sweep_id(cfg, run_id)
    rows, nmse = [], {}
    for variant, result in results.items():
        held = evaluate_sae(store, result.sae, point.layer, sw.site, split, cfg.sae.eval_tokens, train.seed,
                            splits=("heldout",))["heldout"]
        nmse[variant] = held[OVERALL]["nmse"]
        for step, m in held.items():
            rows.append({"variant": variant, "step": step, "run_id": run_id, "layer": point.layer, "site": sw.site,
                         "lr": point.lr, "batch_size": point.batch_size, "k": point.k, "n_latents": point.n_latents,
                         "tokens": trainer.tokens_seen, "seconds": round(seconds, 2),
                         **{k: v for k, v in m.items() if k != "tokens"}})
    ctx.warehouse.replace_partition("sae_sweep", {"sweep_id": sid, "point": key}, rows)
    ctx.log(f"sweep {sid} {key}: {trainer.tokens_seen} tokens in {seconds:.1f}s; held-out nmse "
            + ", ".join(f"{v} {x:.4f}" for v, x in nmse.items()))
    return PointReport(sweep_id=sid, point=point, seconds=seconds, tokens=trainer.tokens_seen, nmse=nmse)
