"""SAE stage: every variant of one (layer, site) trained from one pass over the store, evaluated per step on
train and held-out samples, spliced into the DiT, and published to DuckDB in one transaction."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.context import RunContext
from pipelines.project import content_key
from pipelines.stages.sae_tokens import ResumableStream, TokenReader, token_reader
from pipelines.stages.splice import SpliceReport, make_splice_bench, splice_eval
from storage import ActivationStore, SaeRecord, StoreError
from tide_core.config import heldout_shard_count
from tide_core.sae import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    SAEDesign,
    SAETrainConfig,
    SAETrainer,
    SparseAutoencoder,
    evaluate,
)

FEATURE_TABLES = ("feature_stats", "features", "feature_concepts", "feature_neighbors", "feature_tokens",
                  "feature_factors", "top_images")


@dataclass(frozen=True)
class Split:
    """Sample ids for training and for held-out evaluation (whole shards, so seeds never overlap)."""

    train: np.ndarray
    heldout: np.ndarray


def split_samples(store: ActivationStore, heldout_fraction: float) -> Split:
    lay = store.layout
    if lay.num_shards >= 2:
        n_held = heldout_shard_count(lay.num_shards, heldout_fraction)
        cut = lay.shard_range(lay.num_shards - n_held).start
    else:  # one shard: hold out its tail
        cut = max(1, int(lay.num_samples * (1 - heldout_fraction)))
    ids = np.arange(lay.num_samples)
    return Split(train=ids[:cut], heldout=ids[cut:])


def sae_id(layer: int, site: str, variant: str, n_latents: int, k: int, run_id: str) -> str:
    return f"L{layer:02d}-{site}-{variant}-n{n_latents}-k{k}-{run_id[:8]}"


@dataclass(frozen=True)
class SAEReport:
    """One trained SAE with its metrics."""

    sae_id: str
    variant: str
    path: str
    tokens_seen: int
    seconds: float
    metrics: dict[str, dict[int, dict]]  # split -> step (-1 = overall) -> metric -> value
    splice: SpliceReport | None


@dataclass(frozen=True)
class LayerReport:
    layer: int
    site: str
    run_id: str
    resumed_from: int  # training tokens already done by a killed run (0: trained from the start)
    reports: list[SAEReport]
    samples_drawn: int = 0  # samples sampled again for their activations (sae.stream; 0 when read from the store)


def check_inputs(ctx: RunContext, layer: int, site: str) -> ActivationStore:
    """Fail before training on what cannot work: no store, missing shards, an uncaptured layer or site."""
    store = ctx.store()
    if layer not in store.layout.layers or site not in store.layout.sites:
        raise StoreError(f"({site}, layer {layer}) was not captured: the store has layers {store.layout.layers} "
                         f"and sites {store.layout.sites}; add it to capture.layers / capture.sites and re-capture")
    missing = store.missing_shards()
    if missing:
        raise StoreError(f"the store has incomplete shards {missing[:10]}: materialize `activations` first")
    return store


def training_key(ctx: RunContext, store: ActivationStore) -> str:
    """What a layer's training depends on: the SAE config and the exact store it reads (its run and
    creation time). Names the resume state, so a run killed under one config never resumes under another."""
    return content_key({"sae": ctx.config.sae.model_dump(mode="json"), "run_id": store.provenance["run_id"],
                        "store_created_at": store.provenance.get("created_at")})


def train_layer(ctx: RunContext, layer: int, site: str) -> LayerReport:
    store = check_inputs(ctx, layer, site)
    cfg = ctx.config.sae
    split = split_samples(store, cfg.heldout_fraction)
    tokens = token_reader(ctx, store, layer, site)  # streaming: checks the store against the sampler first
    run_id = store.provenance["run_id"]
    ids = {v: sae_id(layer, site, v, cfg.spec.n_latents, cfg.spec.k, run_id) for v in cfg.variants}
    key = training_key(ctx, store)
    state_dir = ctx.project.saes_dir / "_state" / f"L{layer:02d}-{site}-{key}"
    torch.manual_seed(cfg.train.seed)
    if (state_dir / "trainer.json").exists():
        trainer = SAETrainer.load_state(state_dir)
        ctx.log(f"resuming layer {layer} {site} SAEs from {state_dir} at {trainer.tokens_seen} tokens")
    else:
        trainer = SAETrainer(new_saes(ctx, store, layer, site, cfg.spec, cfg.variants, cfg.train.seed), cfg.train)
    resumed_from = trainer.tokens_seen
    # one stream over the checkpoints (a pause re-reads nothing); a resumed one starts at the first unused token
    stream = ResumableStream(lambda start: training_stream(store, layer, site, split, cfg.train, reader=tokens,
                                                           start=start), keep=2 * cfg.train.batch_size)

    def progress(logs) -> None:
        parts = [f"{n}: mse {r.mse:.4f} L0 {r.l0:.1f} dead {r.dead_fraction:.3f}" for n, r in logs.items()]
        ctx.log(f"  layer {layer} {site} {next(iter(logs.values())).tokens_seen:>9} tokens | " + " | ".join(parts))

    results = trainer.results()
    while trainer.tokens_seen < cfg.train.total_tokens:
        before = trainer.tokens_seen
        results = trainer.fit(stream.at(before), progress=progress, max_tokens=cfg.checkpoint_every_tokens)
        if trainer.tokens_seen < cfg.train.total_tokens:
            trainer.save_state(state_dir)
        if trainer.tokens_seen == before:
            raise StoreError(f"the store ran out of tokens at {before}: lower sae.train.total_tokens")
    # a text site is not spliced: its SAEs never saw padding, and a splice would replace the padding too
    splice = cfg.splice_samples and not store.layout.is_text(site)
    if cfg.splice_samples and not splice:
        ctx.log(f"layer {layer} {site}: a text site, not spliced (no sae_splice rows)")
    bench = make_splice_bench(ctx, store, layer, site, split.heldout) if splice else None
    reports = []
    for variant, result in results.items():
        path = ctx.project.saes_dir / ids[variant]
        result.sae.save(path, meta={"sae_id": ids[variant], "layer": layer, "site": site, "run_id": run_id,
                                    "tokens_seen": trainer.tokens_seen, "training_key": key})
        metrics = evaluate_sae(store, result.sae, layer, site, split, cfg.eval_tokens, cfg.train.seed,
                               reader=tokens)
        splice = None if bench is None else splice_eval(
            bench, SparseAutoencoder.load(path, device=bench.sampler.model.device), ctx.log)  # beside the DiT
        reports.append(SAEReport(sae_id=ids[variant], variant=variant, path=str(path),
                                 tokens_seen=trainer.tokens_seen, seconds=round(result.seconds, 1),
                                 metrics=metrics, splice=splice))
        h = metrics["heldout"][-1]
        ctx.log(f"  {ids[variant]}: heldout nmse {h['nmse']:.4f} cosine {h['cosine']:.4f} "
                f"dead {h['dead_fraction']:.4f}")
    report = LayerReport(layer=layer, site=site, run_id=run_id, resumed_from=resumed_from, reports=reports,
                         samples_drawn=tokens.samples_drawn)
    publish(ctx, report)
    if state_dir.exists():
        shutil.rmtree(state_dir)
    return report


def new_saes(ctx: RunContext, store: ActivationStore, layer: int, site: str, design: SAEDesign,
             variants: list[str], seed: int) -> dict[str, SparseAutoencoder]:
    """Fresh SAEs of every variant for the stored (layer, site): bound to its width and the model's time
    convention; the modulated (tide) variants' modulation fitted to the DiT's adaLN when the design asks."""
    num_train_timesteps = int(store.provenance["model"]["time"]["num_train_timesteps"])
    if design.time_init == "adaln" and site != "resid":
        # what block L+1 applies to block L's output: only the resid site has such a target
        ctx.log(f"layer {layer} {site}: no adaLN target for this site; TIDE's modulation starts at identity")
        design = design.model_copy(update={"time_init": "identity"})
    saes = {v: SparseAutoencoder(design.bind(d_in=store.layout.d_model, variant=v,
                                             num_train_timesteps=num_train_timesteps), seed=seed)
            for v in variants}
    if design.time_init == "adaln":
        for sae in saes.values():
            if sae.spec.modulated:
                _init_from_adaln(ctx, sae, layer, num_train_timesteps)
    return saes


def training_stream(store: ActivationStore, layer: int, site: str, split: Split, train: SAETrainConfig,
                    reader: TokenReader | None = None, start: int = 0):
    """The training tokens of (layer, site) from token ``start`` on: the training samples, shuffled, as many
    epochs as the budget needs; read by ``reader`` (default: the store, in sample blocks)."""
    per_epoch = store.stream_tokens(site, split.train)  # a text site: its valid positions only
    # a batch beyond the budget: the batches end on multiples of batch_size, so a budget that is not one (a
    # text site's epochs hold any number of valid tokens) still gets its last batch; the tokens before are
    # the same whatever the number of epochs
    epochs = -(-(train.total_tokens + train.batch_size) // per_epoch)
    reader = reader or TokenReader(store, layer, site)
    return reader.batches(split.train, train.batch_size, seed=train.seed, epochs=epochs, start=start)


def _init_from_adaln(ctx: RunContext, sae: SparseAutoencoder, layer: int, num_train_timesteps: int) -> None:
    """Fit the tide SAE's modulation MLP to the DiT's own adaLN (scale, shift) at every training timestep."""
    t = torch.arange(num_train_timesteps)
    fit = sae.fit_time_mlp(t, ctx.model.adaln_modulation(layer, t))  # target [T, 2d]
    ctx.log(f"layer {layer}: tide modulation fitted to the DiT's adaLN (mse {fit:.2e})")


def evaluate_sae(store: ActivationStore, sae, layer: int, site: str, split: Split, eval_tokens: int,
                 seed: int, splits: tuple[str, ...] = ("train", "heldout"), reader: TokenReader | None = None) -> dict:
    """split -> step (-1 = overall) -> metric -> value, on up to eval_tokens tokens of each split, read by
    ``reader`` (default: the store, in sample blocks)."""
    reader = reader or TokenReader(store, layer, site)
    out = {}
    for name in splits:
        ids = split.train if name == "train" else split.heldout
        batches = reader.batches(ids, 4096, seed=seed + 7, drop_last=False, limit=eval_tokens)
        res = evaluate(sae, batches, max_tokens=eval_tokens)
        per = {int(s): asdict(m) for s, m in res.per_step.items()}
        per[-1] = asdict(res.overall)
        out[name] = per
    return out


def publish(ctx: RunContext, report: LayerReport) -> None:
    """Replace this (run, layer, site)'s rows in saes, sae_metrics and sae_splice, in one transaction. SAEs
    of the partition from an earlier SAE config are removed, not left beside the new ones; the feature rows
    and edits of every replaced SAE go too (they describe old weights) and are rebuilt downstream."""
    spec = ctx.config.sae.spec
    wh = ctx.warehouse
    old = set()
    if wh.exists():
        old = set(wh.query("SELECT sae_id FROM saes WHERE run_id = ? AND layer = ? AND site = ?",
                           [report.run_id, report.layer, report.site]).column("sae_id").to_pylist())
    new = {r.sae_id for r in report.reports}
    with wh.transaction() as tx:
        for sid in old | new:
            for table in (*FEATURE_TABLES, "edits", "sae_metrics", "sae_splice", "saes"):
                tx.replace_partition(table, {"sae_id": sid}, [])
        for r in report.reports:
            tx.replace_partition("saes", {"sae_id": r.sae_id}, [{
                "run_id": report.run_id, "layer": report.layer, "site": report.site, "variant": r.variant,
                "n_latents": spec.n_latents, "k": spec.k if r.variant != "relu" else None, "path": r.path,
                "tokens_seen": r.tokens_seen}])
            rows = [{"split": split, "step": step, **{k: v for k, v in m.items() if k != "tokens"}}
                    for split, per in r.metrics.items() for step, m in per.items()]
            tx.replace_partition("sae_metrics", {"sae_id": r.sae_id}, rows)
            if r.splice is not None:
                tx.replace_partition("sae_splice", {"sae_id": r.sae_id}, [asdict(r.splice)])
    for sid in old | new:
        (ctx.project.features_dir / f"{sid}.npz").unlink(missing_ok=True)


def missing_checkpoint(rec: SaeRecord) -> str | None:
    """Why the SAE of a `saes` row cannot be loaded (its checkpoint files are gone), or None."""
    if rec.path and all((Path(rec.path) / f).exists() for f in (CONFIG_FILE, WEIGHTS_FILE)):
        return None
    return (f"the checkpoint of SAE {rec.sae_id} is missing: {rec.path} has no {CONFIG_FILE} and {WEIGHTS_FILE}. "
            f"Re-materialize the `sae` asset's partition {int(rec.layer):02d}|{rec.site} "
            f"(tide run --select sae --force) to retrain it")
