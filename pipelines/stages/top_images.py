"""Feature stage behind the `top_images` asset: each feature's top images (overall, and at its peak step)
with patch heatmaps over the full token grid, from the summary `feature_stats` saved; plus its checks. A text
site's "heatmap" is over its text positions (grid 1 x L), padding at zero."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.context import Log, RunContext
from pipelines.stages.capture import CapturePlan, make_plan, recapture_full_grid
from pipelines.stages.features import (
    CheckOutcome,
    FeatureError,
    count_for,
    layer_saes,
    load_sae,
    load_summary,
    summary_path,
)
from storage import TOP_IMAGE_SCOPES, ActivationStore
from tide_core.features import EMPTY, FeatureSummary, heatmaps

HEATMAP_IMAGES = 64  # images encoded at a time when computing heatmaps


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


def resampling_plan(ctx: RunContext, store: ActivationStore) -> CapturePlan | None:
    """The capture plan to sample images again with, when capture kept a subset of tokens (None when it kept
    them all). Checked against the store first: another sampler or model would give other activations."""
    if not store.layout.subsampled:
        return None
    plan = make_plan(ctx)
    store.check_matches(plan.layout, plan.provenance)
    return plan


def full_grids(plan: CapturePlan | None, store: ActivationStore, layer: int, site: str,
               requests: dict[int, Requests], log: Log) -> Callable[[int], np.ndarray]:
    """step -> every token of that step's requested images, float32 [m, T, D]: read from the store, or,
    where capture kept a subset of tokens, recomputed by sampling those images again with ``plan``."""
    lay = store.layout
    if plan is None:
        return lambda step: store.read_tokens(site, layer, step, requests[step].sample_ids).astype(np.float32)
    n_img = len({int(i) for r in requests.values() for i in r.sample_ids})
    log(f"  capture kept {lay.tokens_stored}/{lay.tokens_total} tokens: re-sampling {n_img} images for full "
        "heatmaps")
    grids = recapture_full_grid(plan, layer, site, {s: r.sample_ids for s, r in requests.items()})
    return grids.__getitem__


def build_top_images(ctx: RunContext, layer: int, site: str) -> dict[str, int]:
    """Top images (both scopes) with patch heatmaps for every SAE of (layer, site); replaces their rows."""
    store, records = layer_saes(ctx, layer, site)
    text = store.layout.is_text(site)
    gh, gw = (1, store.layout.tokens_of(site)) if text else store.layout.token_grid
    timesteps = dict(zip(store.layout.steps, store.provenance["capture_timesteps"], strict=True))
    missing = [p for p in (summary_path(ctx, r.sae_id) for r in records) if not p.exists()]
    if missing:
        raise FeatureError(f"no statistics for {', '.join(p.stem for p in missing)} ({missing[0].parent}): "
                           f"materialize `feature_stats` partition {layer:02d}|{site} first")
    plan = None if text else resampling_plan(ctx, store)  # a text site keeps every position
    written = {}
    for rec in records:
        summary = load_summary(summary_path(ctx, rec.sae_id))
        sae = load_sae(rec, store)
        rows = top_image_rows(summary)
        requests = _requests(rows)
        grid_of = full_grids(plan, store, layer, site, requests, ctx.log)
        maps = np.zeros((len(rows["step"]), gh * gw), np.float32)  # [R_all, T]
        for step, req in requests.items():
            acts = grid_of(step)  # [m, T, D]
            for lo in range(0, len(req.sample_ids), HEATMAP_IMAGES):
                pick = (req.rows >= lo) & (req.rows < lo + HEATMAP_IMAGES)
                maps[req.out[pick]] = heatmaps(sae, acts[lo:lo + HEATMAP_IMAGES], timesteps[step],
                                               req.rows[pick] - lo, req.latents[pick])
        if text:
            maps *= store.valid_positions(site)[rows["sample_id"]]  # [R_all, L]: padding is no evidence
        table = pa.table({**{k: v for k, v in rows.items() if k != "scope"},
                          "scope": rows["scope"].astype(str),
                          "heatmap": pa.FixedSizeListArray.from_arrays(maps.ravel(), gh * gw).cast(
                              pa.list_(pa.float32())),
                          "grid_h": np.full(len(maps), gh, np.int32), "grid_w": np.full(len(maps), gw, np.int32)})
        written[rec.sae_id] = ctx.warehouse.replace_partition("top_images", {"sae_id": rec.sae_id},
                                                              table).rows_inserted
        ctx.log(f"  {rec.sae_id}: {written[rec.sae_id]} top images with {gh}x{gw} heatmaps")
    return written


def check_top_images(ctx: RunContext, sae_ids: list[str]) -> dict[str, CheckOutcome]:
    """Grain unique; ranks 1..n without gaps and activations non-increasing per (feature, scope); every
    feature that fired has top images in both scopes."""
    dup = ctx.warehouse.check_grain("top_images")
    gaps = count_for(ctx, "SELECT count(*) FROM (SELECT sae_id, feature_id, scope, max(rank) AS hi, count(*) AS n, "
                        "min(rank) AS lo FROM top_images WHERE list_contains($ids, sae_id) GROUP BY ALL) "
                        "WHERE lo <> 1 OR hi <> n", sae_ids)
    unsorted = count_for(ctx, "SELECT count(*) FROM (SELECT activation, lag(activation) OVER (PARTITION BY sae_id, "
                            "feature_id, scope ORDER BY rank) AS prev FROM top_images WHERE list_contains($ids, "
                            "sae_id)) WHERE prev < activation", sae_ids)
    scopes = ", ".join(f"'{s}'" for s in TOP_IMAGE_SCOPES)  # our own constants, not input
    orphans = count_for(ctx, f"SELECT count(*) FROM features f, (SELECT unnest([{scopes}]) AS scope) s "
                           "WHERE list_contains($ids, f.sae_id) AND f.fire_rate > 0 AND NOT EXISTS (SELECT 1 FROM "
                           "top_images t WHERE t.sae_id = f.sae_id AND t.feature_id = f.feature_id AND t.scope = "
                           "s.scope)", sae_ids)
    return {
        "grain_unique": CheckOutcome(dup == 0, "no duplicate (sae_id, feature_id, scope, rank)", {"duplicates": dup}),
        "ranks_dense_and_sorted": CheckOutcome(gaps == 0 and unsorted == 0,
                                               "ranks 1..n per feature and scope, activations non-increasing",
                                               {"rank_gaps": gaps, "unsorted": unsorted}),
        "live_features_have_images": CheckOutcome(orphans == 0, "every feature that fired has top images",
                                                  {"missing": orphans}),
    }
