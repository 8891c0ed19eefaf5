"""SAE-stage operations behind the `sae` asset: train every variant of one layer from one pass over the
store, evaluate per step on train and held-out samples, splice into the DiT, publish to DuckDB.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipelines.capture_ops import open_store
from pipelines.project import Project, content_key
from storage.activation_store import ActivationStore, StoreError

Log = Callable[[str], None]
SITE = "resid"


@dataclass(frozen=True)
class Split:
    """Sample ids for training and for held-out evaluation (whole shards, so seeds never overlap)."""

    train: np.ndarray
    heldout: np.ndarray


def split_samples(store: ActivationStore, heldout_fraction: float) -> Split:
    lay = store.layout
    if lay.num_shards >= 2:
        n_held = max(1, round(lay.num_shards * heldout_fraction))
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
    splice: dict | None


@dataclass(frozen=True)
class LayerReport:
    layer: int
    run_id: str
    reports: list[SAEReport]


def check_inputs(project: Project, layer: int) -> ActivationStore:
    """Fail before training on what cannot work: no store, missing shards, an uncaptured layer."""
    store = open_store(project)
    if layer not in store.layout.layers:
        raise StoreError(f"layer {layer} was not captured: the store has layers {store.layout.layers}; add it to "
                         "capture.layers and re-capture")
    if SITE not in store.layout.sites:
        raise StoreError(f"site {SITE!r} was not captured (store has {store.layout.sites})")
    missing = store.missing_shards()
    if missing:
        raise StoreError(f"the store has incomplete shards {missing[:10]}: materialize `activations` first")
    return store


def train_layer(project: Project, layer: int, log: Log = print) -> LayerReport:
    import torch

    from tide_core.sae import SAESpec, SparseAutoencoder
    from tide_core.sae_train import SAETrainConfig, SAETrainer, skip_tokens

    store = check_inputs(project, layer)
    cfg = project.config.sae
    split = split_samples(store, cfg.heldout_fraction)
    run_id = store.provenance["run_id"]
    num_train_timesteps = int(store.provenance["sampling"]["scheduler_config"].get("num_train_timesteps", 1000))
    d = store.layout.d_model
    ids = {v: sae_id(layer, SITE, v, cfg.n_latents, cfg.k, run_id) for v in cfg.variants}
    tcfg = SAETrainConfig(total_tokens=cfg.train_tokens, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                          warmup_tokens=min(50_000, cfg.train_tokens // 10), init_tokens=min(16_384, cfg.train_tokens))
    key = training_key(cfg.model_dump(), store)
    reused = reuse_trained(project, layer, ids, key, run_id)
    if reused is not None:
        log(f"layer {layer}: the published SAEs were trained to completion on this store under this SAE "
            f"config (training key {key}): reusing them. Delete {project.root / 'saes'}/L{layer:02d}-* "
            "to train again.")
        return reused
    # Keyed by the training key: a run killed under one config (or store) must not resume under another.
    state_dir = project.root / "saes" / "_state" / f"L{layer:02d}-{key}"
    torch.manual_seed(cfg.seed)
    if (state_dir / "trainer.json").exists():
        trainer = SAETrainer.load_state(state_dir)
        log(f"resuming layer {layer} SAEs from {state_dir} at {trainer.tokens_seen} tokens")
    else:
        saes = {v: SparseAutoencoder(SAESpec(d_in=d, n_latents=cfg.n_latents, k=cfg.k, variant=v,
                                             aux_coeff=cfg.aux_coeff, l1_coeff=cfg.l1_coeff,
                                             dead_tokens_threshold=cfg.dead_tokens,
                                             num_train_timesteps=num_train_timesteps), seed=tcfg.seed)
                for v in cfg.variants}
        if cfg.tide_init == "adaln" and "tide" in saes:
            fit = init_from_adaln(project, saes["tide"], layer, num_train_timesteps)
            log(f"layer {layer}: tide modulation fitted to the DiT's adaLN (mse {fit:.2e})")
        trainer = SAETrainer(saes, tcfg)
    per_epoch = len(split.train) * len(store.layout.steps) * store.layout.tokens_stored
    epochs = -(-cfg.train_tokens // per_epoch)

    def stream():
        return store.iter_token_batches(SITE, layer, cfg.batch_size, seed=cfg.seed, sample_ids=split.train,
                                        epochs=epochs)

    def progress(logs) -> None:
        parts = [f"{n}: mse {r.mse:.4f} L0 {r.l0:.1f} dead {r.dead_fraction:.3f}" for n, r in logs.items()]
        log(f"  layer {layer} {next(iter(logs.values())).tokens_seen:>9} tokens | " + " | ".join(parts))

    results = {}
    while trainer.tokens_seen < cfg.train_tokens:
        before = trainer.tokens_seen
        results = trainer.fit(skip_tokens(stream(), before), progress=progress, max_tokens=cfg.checkpoint_every_tokens)
        if trainer.tokens_seen < cfg.train_tokens:
            trainer.save_state(state_dir)
        if trainer.tokens_seen == before:
            raise RuntimeError(f"the store ran out of tokens at {before}: lower sae.train_tokens")
    reports = []
    bench = make_splice_bench(project, store, layer, split, cfg.splice_samples) if cfg.splice_samples else None
    for variant, result in results.items():
        sae = result.sae
        path = project.root / "saes" / ids[variant]
        sae.save(path, meta={"sae_id": ids[variant], "layer": layer, "site": SITE, "run_id": run_id,
                             "tokens_seen": trainer.tokens_seen, "training_key": key})
        metrics = evaluate_sae(store, sae, layer, split, cfg.eval_tokens, cfg.seed)
        splice = None if bench is None else splice_eval(bench, SparseAutoencoder.load(path),
                                                        project.config.sampling.batch_size, log)
        reports.append(SAEReport(sae_id=ids[variant], variant=variant, path=str(path),
                                 tokens_seen=trainer.tokens_seen, seconds=round(result.seconds, 1),
                                 metrics=metrics, splice=splice))
        log(f"  {ids[variant]}: heldout nmse {metrics['heldout'][-1]['nmse']:.4f} cosine "
            f"{metrics['heldout'][-1]['cosine']:.4f} dead {metrics['heldout'][-1]['dead_fraction']:.4f}")
    if state_dir.exists():
        shutil.rmtree(state_dir)
    report = LayerReport(layer=layer, run_id=run_id, reports=reports)
    publish(project, report)
    return report


def training_key(sae_config: dict, store: ActivationStore) -> str:
    """What a layer's trained SAEs depend on: the whole SAE config and the exact store they read (its run
    and creation time, so a re-capture retrains even under the same config)."""
    return content_key({"sae": sae_config, "run_id": store.provenance["run_id"],
                        "store_created_at": store.provenance.get("created_at")})


def reuse_trained(project: Project, layer: int, ids: dict[str, str], key: str, run_id: str) -> LayerReport | None:
    """The layer's report rebuilt from the warehouse, if every SAE in ``ids`` (variant -> sae_id) has a
    checkpoint finished under ``key`` and published metrics; None if anything must be trained."""
    from storage.warehouse import Warehouse
    from tide_core.sae import CONFIG_FILE, WEIGHTS_FILE

    if not project.duckdb_path.exists():
        return None
    reports = []
    with Warehouse(project.duckdb_path).reading() as wh:  # a few reads per variant, one connection
        for variant, sid in ids.items():
            path = project.root / "saes" / sid
            try:  # without its weights a finished checkpoint is not reusable: retrain, don't point back here
                meta = json.loads((path / CONFIG_FILE).read_text()).get("meta", {})
            except (OSError, ValueError):
                return None
            if not (path / WEIGHTS_FILE).exists():
                return None
            published = wh.query("SELECT count(*) FROM saes WHERE sae_id = ? AND tokens_seen = ?",
                                 [sid, meta.get("tokens_seen", -1)]).column(0)[0].as_py()
            if meta.get("training_key") != key or not published:
                return None
            metrics: dict[str, dict[int, dict]] = {}
            for row in wh.query("SELECT * EXCLUDE (sae_id) FROM sae_metrics WHERE sae_id = ?", [sid]).to_pylist():
                metrics.setdefault(row.pop("split"), {})[row.pop("step")] = row
            if "heldout" not in metrics:
                return None
            splice = wh.query("SELECT * EXCLUDE (sae_id) FROM sae_splice WHERE sae_id = ?", [sid]).to_pylist()
            reports.append(SAEReport(sae_id=sid, variant=variant, path=str(path), tokens_seen=meta["tokens_seen"],
                                     seconds=0.0, metrics=metrics, splice=splice[0] if splice else None))
    return LayerReport(layer=layer, run_id=run_id, reports=reports)


def init_from_adaln(project: Project, sae, layer: int, num_train_timesteps: int) -> float:
    """Fit the tide SAE's modulation MLP to the DiT's adaLN (scale, shift) at every training timestep."""
    import torch

    from tide_core.adaln import adaln_modulation
    from tide_core.dit import load_model

    bundle = load_model(project.config.model, project.base_dir)
    t = torch.arange(num_train_timesteps)
    target = adaln_modulation(bundle.transformer, layer, t, bundle.null_class)  # [T, 2d]
    sae.meta["time_init"] = "adaln"
    return sae.fit_time_mlp(t, target)


def evaluate_sae(store: ActivationStore, sae, layer: int, split: Split, eval_tokens: int, seed: int) -> dict:
    from tide_core.sae_metrics import evaluate

    out = {}
    for name, ids in (("train", split.train), ("heldout", split.heldout)):
        batches = store.iter_token_batches(SITE, layer, 4096, seed=seed + 7, sample_ids=ids, drop_last=False)
        res = evaluate(sae, batches, max_tokens=eval_tokens)
        per = {int(s): asdict(m) for s, m in res.per_step.items()}
        per[-1] = asdict(res.overall)
        out[name] = per
    return out


@dataclass
class SpliceBench:
    """What the spliced evaluation of one layer needs, loaded once and shared by every variant: the DiT,
    the held-out ids and classes, the stored (unspliced) images and, for digits, the judge's verdict on
    them and the real digits' judge features."""

    sampler: object
    layer: int
    ids: np.ndarray
    classes: np.ndarray
    original: np.ndarray  # uint8 [n, H, W, C]
    judge: object | None = None
    original_verdict: object | None = None
    real_features: np.ndarray | None = None


def run_sampler(project: Project, cfg_renorm: float | None = None):
    """The configured DiT with the run's sampler (scheduler, steps, guidance, seed): sample ids give the
    run's images. Shared by the spliced evaluation and feature editing."""
    from tide_core.dit import load_model
    from tide_core.sampling import Sampler

    s = project.config.sampling
    bundle = load_model(project.config.model, project.base_dir)
    return Sampler(bundle, s.scheduler, s.num_steps, s.guidance_scale, s.seed, cfg_renorm=cfg_renorm)


def load_digit_judge(project: Project):
    """The judge for the digits model, or None (another model, or no judge trained yet)."""
    if project.config.model.source != "digits" or not (project.judge_dir / "judge.safetensors").exists():
        return None
    from tide_core.judge import load_judge

    return load_judge(project.judge_dir)


def make_splice_bench(project: Project, store: ActivationStore, layer: int, split: Split, n: int) -> SpliceBench:
    from tide_core.sampling import class_for, from_uint8

    cfg = project.config
    ids = split.heldout[:n]
    classes_all = store.provenance["sampling"]["classes"]
    bench = SpliceBench(sampler=run_sampler(project), layer=layer,
                        ids=ids, classes=np.array([class_for(int(i), classes_all) for i in ids]),
                        original=store.images(int(ids[0]), int(ids[-1]) + 1)[ids - ids[0]])
    bench.judge = load_digit_judge(project)
    if bench.judge is not None:
        from tide_core.digits import load_digits
        from tide_core.digits import split as split_digits
        from tide_core.judge import judge_images

        real = split_digits(load_digits(cfg.model.digits.image_size), cfg.model.judge.test_fraction,
                            cfg.model.judge.seed)[0]
        bench.real_features = judge_images(bench.judge, real.images).features
        bench.original_verdict = judge_images(bench.judge, from_uint8(bench.original))
    return bench


def splice_eval(bench: SpliceBench, sae, batch_size: int, log: Log) -> dict:
    """Resample held-out seeds with the SAE spliced in; compare with the stored (unspliced) images."""
    from tide_core.sampling import from_uint8, to_uint8
    from tide_core.splice import SAESplice

    ids, classes = bench.ids, bench.classes
    spliced = []
    with SAESplice(bench.sampler.bundle.transformer, bench.layer, sae) as splice:
        for i in range(0, len(ids), batch_size):
            spliced.append(bench.sampler.sample(ids[i:i + batch_size], classes[i:i + batch_size],
                                                observer=splice).images)
    spliced_u8 = to_uint8(np.concatenate(spliced))  # [n, H, W, C]
    out = {"split": "heldout", "n_samples": len(ids),
           "pixel_mse": float(((from_uint8(spliced_u8) - from_uint8(bench.original)) ** 2).mean())}
    if bench.judge is not None:
        from tide_core.judge import frechet_distance, judge_images

        a, b = judge_images(bench.judge, from_uint8(spliced_u8)), bench.original_verdict
        out.update(accuracy_spliced=float((a.pred == classes).mean()),
                   accuracy_unspliced=float((b.pred == classes).mean()),
                   frechet_spliced=frechet_distance(a.features, bench.real_features),
                   frechet_unspliced=frechet_distance(b.features, bench.real_features),
                   agreement=float((a.pred == b.pred).mean()))
    log(f"  spliced {sae.meta.get('sae_id', '')}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                                  for k, v in out.items()}))
    return out


def publish(project: Project, report: LayerReport) -> None:
    """Replace this layer's rows in saes, sae_metrics and sae_splice (the partition is (run, layer):
    SAEs of this run and layer from an earlier SAE config are removed, not left beside the new ones)."""
    from storage.warehouse import Warehouse

    wh = Warehouse(project.duckdb_path)
    wh.init_schema()
    cfg = project.config.sae
    old = wh.query("SELECT sae_id FROM saes WHERE run_id = ? AND layer = ?", [report.run_id, report.layer])
    for stale in set(old.column("sae_id").to_pylist()) - {r.sae_id for r in report.reports}:
        for table in ("sae_metrics", "sae_splice", "saes"):
            wh.replace_partition(table, {"sae_id": stale}, [])
        clear_features(project, wh, stale)
    for r in report.reports:
        clear_features(project, wh, r.sae_id)  # new weights: the old feature rows no longer describe them
        wh.replace_partition("saes", {"sae_id": r.sae_id}, [{
            "run_id": report.run_id, "layer": report.layer, "site": SITE, "variant": r.variant,
            "n_latents": cfg.n_latents, "k": cfg.k if r.variant != "relu" else None, "path": r.path,
            "tokens_seen": r.tokens_seen}])
        rows = [{"split": split, "step": step, **{k: v for k, v in m.items() if k != "tokens"}}
                for split, per in r.metrics.items() for step, m in per.items()]
        wh.replace_partition("sae_metrics", {"sae_id": r.sae_id}, rows)
        if r.splice is not None:
            wh.replace_partition("sae_splice", {"sae_id": r.sae_id}, [r.splice])


def clear_features(project: Project, wh, sae_id: str) -> None:
    """Drop an SAE's feature-stage and edit rows and its saved summary (they describe the old weights);
    `feature_stats` / `top_images` / `edits` rebuild them."""
    from pipelines.feature_ops import FEATURE_TABLES, summary_path

    for table in (*FEATURE_TABLES, "edits"):
        wh.replace_partition(table, {"sae_id": sae_id}, [])
    summary_path(project, sae_id).unlink(missing_ok=True)


def missing_checkpoint(rec) -> str | None:
    """Why the SAE of a `saes` row cannot be loaded (its checkpoint files are gone), or None."""
    from tide_core.sae import CONFIG_FILE, WEIGHTS_FILE

    if rec.path and all((Path(rec.path) / f).exists() for f in (CONFIG_FILE, WEIGHTS_FILE)):
        return None
    return (f"the checkpoint of SAE {rec.sae_id} is missing: {rec.path} has no {CONFIG_FILE} and {WEIGHTS_FILE}. "
            f"re-materialize `sae` {int(rec.layer):02d} (the `sae` asset's partition of layer {rec.layer}) to "
            "retrain it")


def sae_paths(project: Project) -> list[Path]:
    return sorted(p for p in (project.root / "saes").glob("L*") if (p / "cfg.json").exists())
