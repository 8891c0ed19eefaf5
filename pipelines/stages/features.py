"""Feature stage behind the `feature_stats` asset: one statistics pass per SAE of a (layer, site).

The pass is a dask graph over the Zarr chunks (local threads, or a dask.distributed scheduler from the
config), reduced to a FeatureSummary; then the warehouse tables feature_stats, features, feature_concepts and
feature_neighbors, all of one SAE in one transaction. The summary is kept beside the SAEs
(features/<sae_id>.npz) so `top_images` adds patch heatmaps without a second pass.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pyarrow as pa
import torch
from distributed import Client

from pipelines.context import RunContext
from pipelines.stages.feature_tokens import token_table
from pipelines.stages.probes import probe_inputs, sae_probes
from pipelines.stages.sae import check_inputs, missing_checkpoint
from storage import OVERALL_STEP, ActivationStore, SaeRecord
from tide_core.features import (
    HIST_EDGES,
    Chunk,
    Concepts,
    FeatureSummary,
    PositionStats,
    StepPartial,
    concept_rows,
    decoder_neighbors,
    merge_all,
    selectivity,
    step_partial,
    summarise,
    tree_reduce,
)
from tide_core.features.concepts import run_concepts, run_factors
from tide_core.features.factor_association import FactorAssociation, factor_association
from tide_core.sae import SparseAutoencoder

DECILES = np.linspace(0.1, 0.9, 9)
# A task per few chunks, merged a few at a time: the threaded scheduler's bookkeeping holds the GIL for
# ~0.5 ms a task, as much as a tenth of a chunk's work (measured with py-spy --gil).
CHUNKS_PER_TASK = 8
MERGE_FAN_IN = 8
STATS_TABLES = ("feature_stats", "features", "feature_concepts", "feature_neighbors", "feature_tokens",
                "feature_factors", "factor_probes")


class FeatureError(ValueError):
    """The feature stage cannot run as configured; the message says what to change."""


@dataclass(frozen=True)
class PassResult:
    """One statistics pass over the store for one SAE."""

    summary: FeatureSummary
    tokens: int
    seconds: float
    positions: PositionStats | None = None  # a text site's firing by (condition, text position), all steps

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class SaeFeatureReport:
    sae_id: str
    variant: str
    n_latents: int
    live: int  # latents that fired at least once
    tokens_per_s: float


@dataclass(frozen=True)
class LayerFeatureReport:
    layer: int
    site: str
    run_id: str
    saes: list[SaeFeatureReport]


def layer_saes(ctx: RunContext, layer: int, site: str) -> tuple[ActivationStore, list[SaeRecord]]:
    """The store and this run's SAEs of (layer, site); clear errors before any pass starts."""
    store = check_inputs(ctx, layer, site)
    run_id = store.provenance["run_id"]
    wh = ctx.warehouse
    rows = wh.query("SELECT * FROM saes WHERE run_id = ? AND layer = ? AND site = ? ORDER BY variant",
                    [run_id, layer, site]).to_pylist() if wh.exists() else []
    if not rows:
        raise FeatureError(f"no SAEs of layer {layer} site {site} for run {run_id} in {wh.path}: materialize "
                           f"the `sae` asset's partition {layer:02d}|{site} first")
    records = [SaeRecord(**r) for r in rows]
    for r in records:
        if problem := missing_checkpoint(r):
            raise FeatureError(problem)
    return store, records


def load_sae(record: SaeRecord, store: ActivationStore) -> SparseAutoencoder:
    sae = SparseAutoencoder.load(record.path).eval()
    sae.check_input(store.layout.d_model)
    return sae


def summary_path(ctx: RunContext, sae_id: str) -> Path:
    return ctx.project.features_dir / f"{sae_id}.npz"


# ------------------------------------------------------------------------------------ statistics pass


def statistics_pass(store: ActivationStore, sae, layer: int, site: str, top_n: int,
                    scheduler: str | None = None, workers: int = 0) -> PassResult:
    """One pass over every (step, shard) chunk of (site, layer) the store holds (a streaming run's: the
    held-out shards), as a dask graph: a task reads and reduces up to CHUNKS_PER_TASK chunks of one step, the
    tasks of a step merge MERGE_FAN_IN at a time, and the steps are summarised at the end. Same numbers on any
    scheduler."""
    lay = store.layout
    timesteps = store.provenance["capture_timesteps"]
    class_ids = store.samples()["class_id"]
    n_classes = int(store.provenance["model"]["num_conditions"])
    sae_d = dask.delayed(sae, pure=True)
    store_d = dask.delayed(store, pure=True)  # pickles as the store's URL
    reduce_chunks = dask.delayed(_chunks_statistics, pure=True)
    merge = dask.delayed(merge_all, pure=True)
    steps = []
    for a, step in enumerate(lay.steps):
        parts = [reduce_chunks(store_d, sae_d, site, layer, step,
                               range(first, min(first + CHUNKS_PER_TASK, lay.num_shards)),
                               int(timesteps[a]), class_ids, n_classes, top_n)
                 for first in range(lay.acts_from_shard, lay.num_shards, CHUNKS_PER_TASK)]
        while len(parts) > 1:  # no task holds every shard's partial when there are many shards
            parts = [merge(parts[i:i + MERGE_FAN_IN]) for i in range(0, len(parts), MERGE_FAN_IN)]
        steps.append(parts[0])
    t0 = time.perf_counter()
    merged = _compute(steps, scheduler, workers)
    summary = summarise(list(merged))
    positions = None if merged[0].positions is None else tree_reduce([m.positions for m in merged],
                                                                     PositionStats.merge)
    return PassResult(summary, int(summary.tokens.sum()), time.perf_counter() - t0, positions)


def _chunks_statistics(store: ActivationStore, sae, site: str, layer: int, step: int, shards: range,
                       timestep: int, class_ids: np.ndarray, n_classes: int, top_n: int) -> StepPartial:
    """Read the Zarr chunks of some shards at one step and reduce them to one partial: the chunks never
    leave the task (the store pickles as its URL for dask.distributed)."""
    ranges = [store.layout.shard_range(shard) for shard in shards]
    chunks = (Chunk(store.read_block(site, layer, step, shard), np.asarray(r), class_ids[r.start:r.stop],
                    store.token_mask(site, r.start, r.stop))  # a text site's valid positions [shard, L]
              for shard, r in zip(shards, ranges, strict=True))  # read one at a time: [shard, P, D] each
    return step_partial(sae, chunks, sum(len(r) for r in ranges), step, timestep, n_classes, top_n)


def _compute(tasks: list, scheduler: str | None, workers: int) -> tuple:
    if scheduler:
        with Client(scheduler, timeout="30s") as client:
            return dask.compute(*tasks, scheduler=client)
    workers = workers or os.cpu_count() or 1
    # Chunks run in parallel threads with a share of the cores each, so they do not oversubscribe them. Set
    # in every worker thread too: MKL's thread count is per thread, and a matmul in a fresh thread used
    # every core (measured in a bare thread).
    share = max(1, (os.cpu_count() or 1) // workers)
    before = torch.get_num_threads()
    torch.set_num_threads(share)
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(share,)) as pool:
            return dask.compute(*tasks, scheduler="threads", pool=pool)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------- publishing


def _masked(values: np.ndarray) -> pa.Array:
    """NaN -> NULL (a latent that never fired has no mean, class or selectivity)."""
    values = np.asarray(values, np.float64)
    return pa.array(values, mask=np.isnan(values))


def _int_or_null(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(values, np.int64), mask=~np.asarray(valid, bool))


def stats_tables(summary: FeatureSummary, neighbors: int, w_dec, concepts: Concepts,
                 images_per_condition: np.ndarray, per_feature: int) -> dict[str, pa.Table]:
    """The four statistics tables of one SAE (without sae_id, which is the partition)."""
    s, n = summary.act_max.shape
    feat = np.arange(n)
    rate = summary.step_fire_rate()  # [S, n]
    live_s = rate > 0
    feature_stats = pa.table({
        "feature_id": np.tile(feat, s), "step": np.repeat(summary.steps, n), "fire_rate": rate.ravel(),
        "mean_act": _masked(summary.step_mean_act().ravel()),
        "max_act": _masked(np.where(live_s, summary.act_max, np.nan).ravel()),
        "top_class": _int_or_null(summary.step_top_class().ravel(), live_s.ravel()),
        "class_selectivity": _masked(summary.step_selectivity().ravel()),
    })
    fire = summary.fire_rate()
    live = fire > 0
    class_rates = summary.class_rates()  # [C, n]
    hist, edges = _trimmed_histograms(summary.hist)
    features = pa.table({
        "feature_id": feat, "fire_rate": fire, "mean_act": _masked(summary.mean_act()),
        "max_act": _masked(np.where(live, summary.max_act(), np.nan)),
        "peak_step": _int_or_null(summary.peak_step(), live),
        "top_class": _int_or_null(class_rates.argmax(0), live),
        "class_selectivity": _masked(selectivity(class_rates)),  # NaN where the feature never fired
        "histogram": pa.array(hist, pa.list_(pa.float64())),
        "histogram_edges": pa.array(edges, pa.list_(pa.float64())),
        "act_quantiles": pa.array([None if np.isnan(q).all() else q.tolist() for q in summary.quantiles(DECILES)],
                                  pa.list_(pa.float64())),
        "tokens": np.full(n, summary.tokens.sum(), np.int64),
    })
    rows = concept_rows(summary, concepts, images_per_condition, per_feature)
    feature_concepts = pa.table({
        "feature_id": rows.feature_id, "concept": pa.array(rows.concept, pa.string()),
        "kind": pa.array(rows.kind, pa.string()), "images": rows.images, "fire_rate": rows.fire_rate,
        "mean_act": _masked(rows.mean_act), "lift": _masked(rows.lift),
    })
    nb = decoder_neighbors(w_dec, neighbors)
    k = nb.ids.shape[1]
    feature_neighbors = pa.table({
        "feature_id": np.repeat(feat, k), "rank": np.tile(np.arange(1, k + 1), n), "neighbor_id": nb.ids.ravel(),
        "cosine": nb.cosine.ravel().astype(np.float64),
    })
    return {"feature_stats": feature_stats, "features": features, "feature_concepts": feature_concepts,
            "feature_neighbors": feature_neighbors}


def _trimmed_histograms(hist: np.ndarray) -> tuple[list, list]:
    """Per latent, the bins from its first to its last non-empty one (None for a silent latent)."""
    counts, edges = [], []
    for row in hist:
        nz = np.flatnonzero(row)
        if len(nz) == 0:
            counts.append(None)
            edges.append(None)
            continue
        lo, hi = nz[0], nz[-1] + 1
        counts.append(row[lo:hi].astype(float).tolist())
        edges.append(HIST_EDGES[lo:hi + 1].tolist())
    return counts, edges


def factor_table(a: FactorAssociation) -> pa.Table:
    """feature_factors rows of one SAE (without sae_id, the partition)."""
    return pa.table({
        "feature_id": a.feature_id, "factor": pa.array(a.factor, pa.string()), "step": a.step.astype(np.int32),
        "best_value": pa.array(a.best_value, pa.string()), "mutual_info": a.mutual_info,
        "normalized_mi": np.clip(a.normalized_mi, 0.0, 1.0), "best_rate": a.best_rate, "lift": _masked(a.lift)})


def save_summary(path: Path, summary: FeatureSummary) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: getattr(summary, k) for k in FeatureSummary.__dataclass_fields__})
    os.replace(tmp, path)  # readers never see half a file


def load_summary(path: Path) -> FeatureSummary:
    with np.load(path) as z:
        return FeatureSummary(**{k: z[k] for k in FeatureSummary.__dataclass_fields__})


def build_feature_stats(ctx: RunContext, layer: int, site: str) -> LayerFeatureReport:
    """The statistics pass for every SAE of (layer, site); replaces each SAE's rows in the four statistics
    tables (and drops its top images, which described the old statistics) in one transaction."""
    store, records = layer_saes(ctx, layer, site)
    cfg = ctx.config.features
    asked = run_factors(store.provenance, ctx.family.judge_class)
    concepts = run_concepts(store.provenance, asked)
    passed = store.samples()["class_id"][store.layout.act_samples.start:]  # the images the pass reads
    images_per_condition = np.bincount(passed, minlength=concepts.incidence.shape[0])
    probes = probe_inputs(ctx, store, layer, site) if asked is not None else None
    reports = []
    sequences: list = []

    def texts() -> list:  # the prompts' text streams, from the family's tokenizers (once, for text sites only)
        if not sequences:
            sequences.extend(ctx.family.text_sequences(ctx.config.model, [p["text"] for p in store.provenance["prompts"]]))
        return sequences

    for rec in records:
        sae = load_sae(rec, store)
        result = statistics_pass(store, sae, layer, site, cfg.top_n, cfg.scheduler, cfg.workers)
        path = summary_path(ctx, rec.sae_id)
        path.unlink(missing_ok=True)  # a run killed after the tables must not leave the old summary beside them
        tables = stats_tables(result.summary, cfg.neighbors, sae.W_dec.detach(), concepts, images_per_condition,
                              cfg.concepts_per_feature)  # before the file is locked
        if asked is not None:
            tables["feature_factors"] = factor_table(factor_association(result.summary, asked, OVERALL_STEP))
        if probes is not None:
            tables["factor_probes"] = sae_probes(probes, sae, cfg.probe_folds)
        if result.positions is not None:
            tables["feature_tokens"] = token_table(result.positions, texts(), store.provenance,
                                                   images_per_condition, len(store.layout.steps), rec.n_latents)
        with ctx.warehouse.transaction() as tx:
            tx.replace_partition("top_images", {"sae_id": rec.sae_id}, [])
            for name, table in tables.items():
                tx.replace_partition(name, {"sae_id": rec.sae_id}, table)
        save_summary(path, result.summary)
        live = int((result.summary.fire_rate() > 0).sum())
        ctx.log(f"  {rec.sae_id}: {result.tokens:,} tokens in {result.seconds:.1f}s "
                f"({result.tokens_per_s:,.0f} tokens/s), {live}/{rec.n_latents} latents fired")
        reports.append(SaeFeatureReport(rec.sae_id, rec.variant, rec.n_latents, live, result.tokens_per_s))
    return LayerFeatureReport(layer, site, store.provenance["run_id"], reports)


# --------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict


def count_for(ctx: RunContext, sql: str, sae_ids: list[str]) -> int:
    """A count over these SAEs' rows: ``sql`` names them as ``list_contains($ids, sae_id)``."""
    return int(ctx.warehouse.query(sql, {"ids": list(sae_ids)}).column(0)[0].as_py() or 0)


def check_feature_stats(ctx: RunContext, sae_ids: list[str]) -> dict[str, CheckOutcome]:
    """Grains unique in the four statistics tables; every rate within [0, 1]; for these SAEs."""
    dup = {t: ctx.warehouse.check_grain(t) for t in STATS_TABLES}
    bad = {t: count_for(ctx, f"SELECT count(*) FROM {t} WHERE list_contains($ids, sae_id) AND NOT (fire_rate "
                           "BETWEEN 0 AND 1 AND coalesce(class_selectivity BETWEEN 0 AND 1, TRUE))", sae_ids)
           for t in ("feature_stats", "features")}
    bad["feature_concepts"] = count_for(ctx, "SELECT count(*) FROM feature_concepts WHERE list_contains($ids, "
                                             "sae_id) AND NOT (fire_rate > 0 AND fire_rate <= 1 AND lift > 0)", sae_ids)
    return {
        "grains_unique": CheckOutcome(not any(dup.values()), "no duplicate grain in the statistics tables", dup),
        "rates_in_unit_interval": CheckOutcome(not any(bad.values()), "fire rates and selectivity in [0, 1]", bad),
    }
