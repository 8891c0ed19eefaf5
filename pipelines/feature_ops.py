"""Feature stage behind the `feature_stats` and `top_images` assets.

For every SAE of a layer: one streaming pass over the stored activations, as a dask graph over the Zarr
chunks (local threads, or a dask.distributed scheduler from the config), reduced to a FeatureSummary;
then the warehouse tables feature_stats, features, feature_classes and feature_neighbors. The summary is
kept beside the SAEs (features/<sae_id>.npz) so `top_images` can add patch heatmaps without a second pass.
"""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.project import Project, content_key
from pipelines.sae_ops import SITE, check_inputs, missing_checkpoint
from storage.activation_store import ActivationStore
from storage.schema import TOP_IMAGE_SCOPES
from storage.warehouse import SaeRecord, Warehouse
from tide_core.feature_stats import (
    EMPTY,
    HIST_EDGES,
    Chunk,
    FeatureSummary,
    StepPartial,
    decoder_neighbors,
    heatmaps,
    merge_all,
    selectivity,
    step_partial,
    summarise,
)

Log = Callable[[str], None]
DECILES = np.linspace(0.1, 0.9, 9)
HEATMAP_IMAGES = 64  # images encoded at a time when computing heatmaps
# A task per few chunks, merged a few at a time: the threaded scheduler's bookkeeping holds the GIL for
# ~0.5 ms a task, as much as a tenth of a chunk's work (measured with py-spy --gil).
CHUNKS_PER_TASK = 8
MERGE_FAN_IN = 8
STATS_TABLES = ("feature_stats", "features", "feature_classes", "feature_neighbors")  # the `feature_stats` asset
FEATURE_TABLES = (*STATS_TABLES, "top_images")


class FeatureError(ValueError):
    """The feature stage cannot run as configured; the message says what to change."""


@dataclass(frozen=True)
class PassResult:
    """One statistics pass over the store for one SAE."""

    summary: FeatureSummary
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class SaeFeatureReport:
    sae_id: str
    variant: str
    n_latents: int
    live: int  # latents that fired at least once
    tokens_per_s: float | None  # None: reused from an earlier pass under the same feature key


@dataclass(frozen=True)
class LayerFeatureReport:
    layer: int
    run_id: str
    saes: list[SaeFeatureReport]


# ---------------------------------------------------------------------------------------------- inputs


def layer_saes(project: Project, layer: int) -> tuple[ActivationStore, list[SaeRecord]]:
    """The store and this run's SAEs of `layer`; clear errors before any pass starts."""
    store = check_inputs(project, layer)
    run_id = store.provenance["run_id"]
    wh = Warehouse(project.duckdb_path)
    rows = wh.query("SELECT * FROM saes WHERE run_id = ? AND layer = ? ORDER BY variant",
                    [run_id, layer]).to_pylist() if wh.exists() else []
    if not rows:
        raise FeatureError(f"no SAEs of layer {layer} for run {run_id} in {project.duckdb_path}: materialize the "
                           f"`sae` asset's partition {layer:02d} first")
    records = [SaeRecord(**r) for r in rows]
    for r in records:
        if problem := missing_checkpoint(r):
            raise FeatureError(problem)
    return store, records


def load_sae(record: SaeRecord, store: ActivationStore):
    from tide_core.sae import SparseAutoencoder

    sae = SparseAutoencoder.load(record.path).eval()
    sae.check_input(store.layout.d_model)
    return sae


# ------------------------------------------------------------------------------------ statistics pass


def statistics_pass(store: ActivationStore, sae, layer: int, top_n: int, scheduler: str | None = None,
                    workers: int = 0, site: str = SITE) -> PassResult:
    """One pass over every (step, shard) chunk of (site, layer), as a dask graph: a task reads and reduces
    up to CHUNKS_PER_TASK chunks of one step, the tasks of a step merge MERGE_FAN_IN at a time, and the
    steps are summarised at the end. Same numbers on any scheduler."""
    import dask

    lay = store.layout
    timesteps = store.provenance["capture_timesteps"]
    class_ids = store.samples()["class_id"]
    n_classes = int(store.provenance["model"]["num_classes"])
    sae_d = dask.delayed(sae, pure=True)
    store_d = dask.delayed(store, pure=True)  # pickles as the store's URL
    reduce_chunks = dask.delayed(_chunks_statistics, pure=True)
    merge = dask.delayed(merge_all, pure=True)
    steps = []
    for a, step in enumerate(lay.steps):
        parts = [reduce_chunks(store_d, sae_d, site, layer, step, range(first, min(first + CHUNKS_PER_TASK,
                                                                                    lay.num_shards)),
                               int(timesteps[a]), class_ids, n_classes, top_n)
                 for first in range(0, lay.num_shards, CHUNKS_PER_TASK)]
        while len(parts) > 1:  # no task holds every shard's partial when there are many shards
            parts = [merge(parts[i:i + MERGE_FAN_IN]) for i in range(0, len(parts), MERGE_FAN_IN)]
        steps.append(parts[0])
    t0 = time.perf_counter()
    merged = _compute(steps, scheduler, workers)
    summary = summarise(list(merged))
    return PassResult(summary, int(summary.tokens.sum()), time.perf_counter() - t0)


def _chunks_statistics(store: ActivationStore, sae, site: str, layer: int, step: int, shards: range,
                       timestep: int, class_ids: np.ndarray, n_classes: int, top_n: int) -> StepPartial:
    """Read the Zarr chunks of some shards at one step and reduce them to one partial: the chunks never
    leave the task (the store pickles as its URL for dask.distributed)."""
    ranges = [store.layout.shard_range(shard) for shard in shards]
    chunks = (Chunk(store.read_block(site, layer, step, shard), np.asarray(r), class_ids[r.start:r.stop])
              for shard, r in zip(shards, ranges, strict=True))  # read one at a time: [shard, P, D] each
    return step_partial(sae, chunks, sum(len(r) for r in ranges), step, timestep, n_classes, top_n)


def _compute(tasks: list, scheduler: str | None, workers: int) -> tuple:
    import dask
    import torch

    if scheduler:
        from distributed import Client

        with Client(scheduler, timeout="30s") as client:
            return dask.compute(*tasks, scheduler=client)
    workers = workers or os.cpu_count() or 1
    # Chunks run in parallel threads with a share of the cores each, so they do not oversubscribe them. Set
    # in every worker thread too: MKL's thread count is per thread, and a matmul in a fresh thread used
    # every core (measured in a bare thread; dask's threads showed no difference in the pass).
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


def stats_tables(summary: FeatureSummary, neighbors: int, w_dec) -> dict[str, pa.Table]:
    """The four statistics tables of one SAE (without sae_id, which is the partition)."""
    s, n = summary.act_max.shape
    c = summary.class_tokens.shape[1]
    feat = np.arange(n)
    rate = summary.step_fire_rate()  # [S, n]
    live_s = rate > 0
    sel_s = summary.step_selectivity()
    feature_stats = pa.table({
        "feature_id": np.tile(feat, s), "step": np.repeat(summary.steps, n), "fire_rate": rate.ravel(),
        "mean_act": _masked(summary.step_mean_act().ravel()),
        "max_act": _masked(np.where(live_s, summary.act_max, np.nan).ravel()),
        "top_class": _int_or_null(summary.step_top_class().ravel(), live_s.ravel()),
        "class_selectivity": _masked(sel_s.ravel()),
    })
    fire = summary.fire_rate()
    live = fire > 0
    class_rates = summary.class_rates()  # [C, n]
    sel = selectivity(class_rates)  # NaN where the feature never fired
    hist, edges = _trimmed_histograms(summary.hist)
    features = pa.table({
        "feature_id": feat, "fire_rate": fire, "mean_act": _masked(summary.mean_act()),
        "max_act": _masked(np.where(live, summary.max_act(), np.nan)),
        "peak_step": _int_or_null(summary.peak_step(), live),
        "top_class": _int_or_null(class_rates.argmax(0), live), "class_selectivity": _masked(sel),
        "histogram": pa.array(hist, pa.list_(pa.float64())), "histogram_edges": pa.array(edges, pa.list_(pa.float64())),
        "act_quantiles": pa.array([None if np.isnan(q).all() else q.tolist() for q in summary.quantiles(DECILES)],
                                  pa.list_(pa.float64())),
        "tokens": np.full(n, summary.tokens.sum(), np.int64),
    })
    feature_classes = pa.table({
        "feature_id": np.tile(feat, c), "class_id": np.repeat(np.arange(c), n), "fire_rate": class_rates.ravel(),
        "mean_act": _masked(summary.class_mean_act().ravel()),
    })
    nb = decoder_neighbors(w_dec, neighbors)
    k = nb.ids.shape[1]
    feature_neighbors = pa.table({
        "feature_id": np.repeat(feat, k), "rank": np.tile(np.arange(1, k + 1), n), "neighbor_id": nb.ids.ravel(),
        "cosine": nb.cosine.ravel().astype(np.float64),
    })
    return {"feature_stats": feature_stats, "features": features, "feature_classes": feature_classes,
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


def summary_path(project: Project, sae_id: str) -> Path:
    return project.root / "features" / f"{sae_id}.npz"


def save_summary(path: Path, summary: FeatureSummary, key: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, key=np.array(key), **{k: getattr(summary, k) for k in FeatureSummary.__dataclass_fields__})
    os.replace(tmp, path)  # readers never see half a file


def load_summary(path: Path) -> FeatureSummary:
    with np.load(path) as z:
        return FeatureSummary(**{k: z[k] for k in FeatureSummary.__dataclass_fields__})


def summary_key(path: Path) -> str:
    """The feature key a saved summary was computed under ("" if none or no file)."""
    try:
        with np.load(path) as z:
            return str(z["key"]) if "key" in z.files else ""
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # missing, empty or cut short: not on record
        return ""


def feature_key(sae, cfg) -> str:
    """What an SAE's feature statistics depend on: its training key (the SAE config and the store it was
    trained on) and the feature settings that change results. "" for an SAE without one: always redone."""
    training = sae.meta.get("training_key")
    if not training:
        return ""
    return content_key({"sae_id": sae.meta.get("sae_id"), "training": training, "top_n": cfg.top_n,
                        "neighbors": cfg.neighbors})


def build_feature_stats(project: Project, layer: int, log: Log = print) -> LayerFeatureReport:
    """The statistics pass for every SAE of `layer`; replaces their rows in the four statistics tables."""
    store, records = layer_saes(project, layer)
    cfg = project.config.features
    wh = Warehouse(project.duckdb_path)
    reports = []
    for rec in records:
        sae = load_sae(rec, store)
        key, path = feature_key(sae, cfg), summary_path(project, rec.sae_id)
        on_record = wh.query("SELECT count(*) AS n, count(*) FILTER (WHERE fire_rate > 0) AS live FROM features "
                             "WHERE sae_id = ?", [rec.sae_id]).to_pylist()[0]
        if key and summary_key(path) == key and on_record["n"] == rec.n_latents:
            log(f"  {rec.sae_id}: statistics on record for this SAE and these settings (key {key}): reusing "
                f"them; delete {path} to recompute")
            reports.append(SaeFeatureReport(rec.sae_id, rec.variant, rec.n_latents, on_record["live"], None))
            continue
        result = statistics_pass(store, sae, layer, cfg.top_n, cfg.scheduler, cfg.workers)
        # The summary goes first and comes back last: a run killed between the table writes below must not
        # leave a summary that says they all finished. The old top images came from the old summary.
        path.unlink(missing_ok=True)
        wh.replace_partition("top_images", {"sae_id": rec.sae_id}, [])
        for name, table in stats_tables(result.summary, cfg.neighbors, sae.W_dec.detach()).items():
            wh.replace_partition(name, {"sae_id": rec.sae_id}, table)
        save_summary(path, result.summary, key)
        live = int((result.summary.fire_rate() > 0).sum())
        log(f"  {rec.sae_id}: {result.tokens:,} tokens in {result.seconds:.1f}s "
            f"({result.tokens_per_s:,.0f} tokens/s), {live}/{rec.n_latents} latents fired")
        reports.append(SaeFeatureReport(rec.sae_id, rec.variant, rec.n_latents, live, result.tokens_per_s))
    return LayerFeatureReport(layer, store.provenance["run_id"], reports)


# ----------------------------------------------------------------------------------------- top images


@dataclass(frozen=True)
class Requests:
    """Heatmaps wanted at one step: image i of `sample_ids` for latent `latents[j]`, row `rows[j]`."""

    sample_ids: np.ndarray  # int64 [m] sorted unique images needed at this step
    rows: np.ndarray  # int64 [R] index into sample_ids
    latents: np.ndarray  # int64 [R]
    out: np.ndarray  # int64 [R] row of the top-images table this heatmap belongs to


def top_image_rows(summary: FeatureSummary) -> dict[str, np.ndarray]:
    """Both scopes' top images as columns (feature_id, scope, rank, sample_id, step, activation)."""
    cols: dict[str, list] = {k: [] for k in ("feature_id", "scope", "rank", "sample_id", "step", "activation")}
    for scope, top in (("overall", summary.top_overall()), ("peak_step", summary.top_at_peak())):
        f, r = np.nonzero(top.value > EMPTY)  # row-major: features ascending, ranks ascending
        cols["feature_id"].append(f)
        cols["scope"].append(np.full(len(f), scope, object))
        cols["rank"].append(r + 1)
        cols["sample_id"].append(top.sample_id[f, r])
        cols["step"].append(top.step[f, r])
        cols["activation"].append(top.value[f, r].astype(np.float64))
    return {k: np.concatenate(v) for k, v in cols.items()}


def _requests(rows: dict[str, np.ndarray]) -> dict[int, Requests]:
    out = {}
    for step in np.unique(rows["step"]):
        where = np.flatnonzero(rows["step"] == step)
        ids, inv = np.unique(rows["sample_id"][where], return_inverse=True)
        out[int(step)] = Requests(ids, inv, rows["feature_id"][where], where)
    return out


def resampling_plan(project: Project, store: ActivationStore):
    """The capture plan to sample images again with, when capture kept a subset of tokens (None when it kept
    them all). Checked against the store first: another sampler or model would give other activations."""
    if not store.layout.subsampled:
        return None
    from pipelines.capture_ops import capture_plan

    plan = capture_plan(project)
    store.check_matches(plan.layout, plan.provenance)
    return plan


def full_grids(plan, store: ActivationStore, layer: int, requests: dict[int, Requests],
               log: Log) -> Callable[[int], np.ndarray]:
    """step -> every token of that step's requested images, float32 [m, T, D]: read from the store, or,
    where capture kept a subset of tokens, recomputed by sampling those images again with ``plan``."""
    lay = store.layout
    if plan is None:
        arr = store.array(SITE, layer)
        return lambda step: arr.get_orthogonal_selection(
            (lay.step_axis(step), requests[step].sample_ids)).astype(np.float32)
    from pipelines.capture_run import recapture_full_grid

    n_img = len({int(i) for r in requests.values() for i in r.sample_ids})
    log(f"  capture kept {lay.tokens_stored}/{lay.tokens_total} tokens: re-sampling {n_img} images for full "
        "heatmaps")
    grids = recapture_full_grid(plan, layer, SITE, {s: r.sample_ids for s, r in requests.items()})
    return grids.__getitem__


def build_top_images(project: Project, layer: int, log: Log = print) -> dict[str, int]:
    """Top images (both scopes) with patch heatmaps for every SAE of `layer`; replaces their rows."""
    store, records = layer_saes(project, layer)
    wh = Warehouse(project.duckdb_path)
    gh, gw = store.layout.token_grid
    timesteps = dict(zip(store.layout.steps, store.provenance["capture_timesteps"], strict=True))
    missing = [p for p in (summary_path(project, r.sae_id) for r in records) if not p.exists()]
    if missing:
        raise FeatureError(f"no statistics for {', '.join(p.stem for p in missing)} ({missing[0].parent}): "
                           f"materialize `feature_stats` partition {layer:02d} first")
    plan = resampling_plan(project, store)
    written = {}
    for rec in records:
        path = summary_path(project, rec.sae_id)
        key = summary_key(path)
        on_record = wh.query("SELECT count(*) FROM top_images WHERE sae_id = ?", [rec.sae_id]).column(0)[0].as_py()
        if key and on_record:
            # feature_stats drops these rows whenever it recomputes the summary: they belong to this one
            written[rec.sae_id] = on_record
            log(f"  {rec.sae_id}: top images of the current statistics (key {key}) on record: reusing them")
            continue
        summary = load_summary(path)
        sae = load_sae(rec, store)
        rows = top_image_rows(summary)
        requests = _requests(rows)
        grid_of = full_grids(plan, store, layer, requests, log)
        maps = np.zeros((len(rows["step"]), gh * gw), np.float32)  # [R_all, T]
        for step, req in requests.items():
            acts = grid_of(step)  # [m, T, D]
            for lo in range(0, len(req.sample_ids), HEATMAP_IMAGES):
                pick = (req.rows >= lo) & (req.rows < lo + HEATMAP_IMAGES)
                maps[req.out[pick]] = heatmaps(sae, acts[lo:lo + HEATMAP_IMAGES], timesteps[step],
                                               req.rows[pick] - lo, req.latents[pick])
        table = pa.table({**{k: v for k, v in rows.items() if k != "scope"},
                          "scope": rows["scope"].astype(str),
                          "heatmap": pa.FixedSizeListArray.from_arrays(maps.ravel(), gh * gw).cast(
                              pa.list_(pa.float32())),
                          "grid_h": np.full(len(maps), gh, np.int32), "grid_w": np.full(len(maps), gw, np.int32)})
        written[rec.sae_id] = wh.replace_partition("top_images", {"sae_id": rec.sae_id}, table).rows_inserted
        log(f"  {rec.sae_id}: {written[rec.sae_id]} top images with {gh}x{gw} heatmaps")
    return written


def build_layer_features(project: Project, layer: int, log: Log = print) -> LayerFeatureReport:
    """Both feature assets' work for one layer: statistics, then top images."""
    report = build_feature_stats(project, layer, log)
    build_top_images(project, layer, log)
    return report


# --------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict


def _scalar(wh: Warehouse, sql: str, sae_ids: list[str]) -> int:
    """A count over these SAEs' rows: ``sql`` names them as ``list_contains($ids, sae_id)``."""
    return int(wh.query(sql, {"ids": list(sae_ids)}).column(0)[0].as_py() or 0)


def check_feature_stats(project: Project, sae_ids: list[str]) -> dict[str, CheckOutcome]:
    """Grains unique in the four statistics tables; every rate within [0, 1]; for these SAEs."""
    wh = Warehouse(project.duckdb_path)
    dup = {t: wh.check_grain(t) for t in STATS_TABLES}
    bad = {t: _scalar(wh, f"SELECT count(*) FROM {t} WHERE list_contains($ids, sae_id) AND NOT (fire_rate "
                          "BETWEEN 0 AND 1 AND coalesce(class_selectivity BETWEEN 0 AND 1, TRUE))", sae_ids)
           for t in ("feature_stats", "features")}
    bad["feature_classes"] = _scalar(wh, "SELECT count(*) FROM feature_classes WHERE list_contains($ids, sae_id) "
                                         "AND NOT fire_rate BETWEEN 0 AND 1", sae_ids)
    return {
        "grains_unique": CheckOutcome(not any(dup.values()), "no duplicate grain in the statistics tables", dup),
        "rates_in_unit_interval": CheckOutcome(not any(bad.values()), "fire rates and selectivity in [0, 1]", bad),
    }


def check_top_images(project: Project, sae_ids: list[str]) -> dict[str, CheckOutcome]:
    """Grain unique; ranks 1..n without gaps and activations non-increasing per (feature, scope); every
    feature that fired has top images in both scopes."""
    wh = Warehouse(project.duckdb_path)
    dup = wh.check_grain("top_images")
    gaps = _scalar(wh, "SELECT count(*) FROM (SELECT sae_id, feature_id, scope, max(rank) AS hi, count(*) AS n, "
                       "min(rank) AS lo FROM top_images WHERE list_contains($ids, sae_id) GROUP BY ALL) "
                       "WHERE lo <> 1 OR hi <> n", sae_ids)
    unsorted = _scalar(wh, "SELECT count(*) FROM (SELECT activation, lag(activation) OVER (PARTITION BY sae_id, "
                           "feature_id, scope ORDER BY rank) AS prev FROM top_images WHERE list_contains($ids, sae_id)) "
                           "WHERE prev < activation", sae_ids)
    scopes = ", ".join(f"'{s}'" for s in TOP_IMAGE_SCOPES)  # our own constants, not input
    orphans = _scalar(wh, f"SELECT count(*) FROM features f, (SELECT unnest([{scopes}]) AS scope) s "
                          "WHERE list_contains($ids, f.sae_id) AND f.fire_rate > 0 AND NOT EXISTS (SELECT 1 FROM "
                          "top_images t WHERE t.sae_id = f.sae_id AND t.feature_id = f.feature_id AND t.scope = s.scope)",
                      sae_ids)
    return {
        "grain_unique": CheckOutcome(dup == 0, "no duplicate (sae_id, feature_id, scope, rank)", {"duplicates": dup}),
        "ranks_dense_and_sorted": CheckOutcome(gaps == 0 and unsorted == 0,
                                               "ranks 1..n per feature and scope, activations non-increasing",
                                               {"rank_gaps": gaps, "unsorted": unsorted}),
        "live_features_have_images": CheckOutcome(orphans == 0, "every feature that fired has top images",
                                                  {"missing": orphans}),
    }
