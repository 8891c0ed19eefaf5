"""One SAE's part of the site: its entry in site.json, its feature list and its feature detail files.

The feature list (data/sae/<slug>/features.json) is column-wise, what the SAE page sorts and filters.
The details of each feature (per-step curves, concepts, histogram, top images with heatmaps, neighbours,
edits) go into chunk files of CHUNK features (data/sae/<slug>/f/<f // CHUNK>.json), so a feature page
makes one small fetch however many features the SAE has. The warehouse is read READ_BLOCK features at
a time: the heatmaps of a 16k-feature SAE would not fit in memory at once.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from dashboards.data import FeatureBlock, MetricSeries, SaeInfo, WarehouseReader
from dashboards.writer import SiteWriter, json_column, json_columns, json_number, json_value

CHUNK = 16  # features per detail file: one fetch per feature page, ~16x fewer files than one per feature
READ_BLOCK = 1024  # features per warehouse read (bounds memory: heatmaps of 16k features would not fit)

# (sae_id, feature_id) -> the edits of that feature, as the steering preview shows them
EditsByFeature = dict[tuple[str, int], list[dict[str, Any]]]


def sae_doc(sae: SaeInfo, slug: str, metrics: dict[str, MetricSeries],
            splice: dict[str, dict[str, Any]], probes: pa.Table | None = None) -> dict[str, Any]:
    """The SAE's entry in site.json: its shape, metrics per split and step, spliced-sampling quality, and
    its factor probes (column-wise ``factor_probes`` rows: factor, step, k, accuracy, chance), if any."""
    def series(m: MetricSeries) -> dict[str, Any]:
        values = {k: [json_number(v) for v in vs] for k, vs in m.values.items()}
        dead = m.values.get("dead_fraction", [])
        values["live_features"] = [None if d is None else round(sae.n_latents * (1 - d)) for d in dead]
        return {"steps": m.steps, "values": values, "overall": json_value(m.overall)}

    return {
        "sae_id": sae.sae_id, "slug": slug, "run_id": sae.run_id, "layer": sae.layer,
        "site": sae.site, "variant": sae.variant, "n_latents": sae.n_latents, "k": sae.k,
        "tokens_seen": sae.tokens_seen, "n_features": sae.n_features,
        "metrics": {split: series(m) for split, m in metrics.items()},
        "splice": json_value(splice),
        "probes": json_columns(probes) if probes is not None and probes.num_rows else None,
    }


def feature_list_doc(sae: SaeInfo, listing: pa.Table) -> dict[str, Any]:
    """Column-wise (one array per column): a third of the size of row objects, and what the JS sorts."""
    flat = [name for name in listing.column_names  # list columns are for the feature page
            if name != "sae_id" and not pa.types.is_nested(listing.schema.field(name).type)]
    columns = {name: json_column(listing.column(name)) for name in flat}
    return {"sae_id": sae.sae_id, "n": listing.num_rows, "columns": columns}


def write_feature_chunks(w: SiteWriter, reader: WarehouseReader, sae: SaeInfo, slug: str,
                         edits: EditsByFeature) -> None:
    """data/sae/<slug>/f/<c>.json: the details of features [c * CHUNK, (c + 1) * CHUNK), a block at a time."""
    lo, hi = reader.feature_id_range(sae.sae_id)
    start = lo - lo % CHUNK  # chunk files are aligned: feature f lives in chunk f // CHUNK
    for block_lo in range(start, hi, READ_BLOCK):
        block = reader.feature_block(sae.sae_id, block_lo, min(hi, block_lo + READ_BLOCK))
        details = _feature_details(block)
        chunks: dict[int, dict[str, Any]] = {}
        for fid, doc in details.items():
            doc["edits"] = edits.get((sae.sae_id, fid), [])
            chunks.setdefault(fid // CHUNK, {})[str(fid)] = doc
        for c, docs in chunks.items():
            w.write_json(f"data/sae/{slug}/f/{c}.json", {"sae_id": sae.sae_id, "chunk": c, "features": docs})


# Columns a feature page does not need per row: the SAE and feature are the page's, and sample-level
# facts (class name, seed, judge verdict) are one click away on the sample page; class names are in site.json.
_DETAIL_DROP = {"sae_id", "feature_id", "scope", "heatmap", "grid_h", "grid_w", "class_name", "seed",
                "judge_pred", "judge_conf"}


class Span(NamedTuple):
    """The rows [start, stop) of one feature in a table ordered by feature."""

    feature_id: int
    start: int
    stop: int


def _feature_details(block: FeatureBlock) -> dict[int, dict[str, Any]]:
    """feature_id -> everything its page shows, from one block of rows.

    Per-feature tables are column-wise ({column: [values]}, rows ordered by step, class or rank): each
    column is converted to JSON values once for the whole block and then sliced per feature, which keeps
    a 16k-feature SAE to seconds.
    """
    docs: dict[int, dict[str, Any]] = {}

    def doc(fid: int) -> dict[str, Any]:
        return docs.setdefault(fid, {"stats": {}, "hist": None, "steps": {}, "concepts": {}, "factors": {}, "top": {},
                                     "grid": None, "heat_max": None, "neighbors": {}, "edits": []})

    feats = block.features
    stats = json_columns(feats, {"sae_id", "feature_id", "histogram", "histogram_edges"})
    hist = feats.column("histogram").to_pylist() if "histogram" in feats.column_names else []
    edges = feats.column("histogram_edges").to_pylist() if "histogram_edges" in feats.column_names else []
    for i, fid in enumerate(feats.column("feature_id").to_pylist()):
        d = doc(fid)
        d["stats"] = {k: v[i] for k, v in stats.items()}
        d["hist"] = _trim_histogram(hist[i] if hist else None, edges[i] if edges else None)
    for key, table in (("steps", block.steps), ("concepts", block.concepts), ("factors", block.factors),
                       ("neighbors", block.neighbors)):
        cols = json_columns(table, _DETAIL_DROP)
        for fid, a, b in _spans(table):
            doc(fid)[key] = {k: v[a:b] for k, v in cols.items()}
    _add_top_images(block.top, doc)
    return docs


def _add_top_images(top: pa.Table, doc: Callable[[int], dict[str, Any]]) -> None:
    """Top images per scope (column-wise); heatmaps as base64 uint8 scaled by the feature's largest patch."""
    if not top.num_rows:
        return
    spans = _spans(top)
    heats, peaks = _quantised_heatmaps(top, spans)
    cols = json_columns(top, _DETAIL_DROP)
    scopes = top.column("scope").to_pylist()
    grid_h, grid_w = top.column("grid_h").to_pylist(), top.column("grid_w").to_pylist()
    for fid, a, b in spans:
        d = doc(fid)
        d["heat_max"] = json_number(peaks[a])
        for j in range(a, b):
            if heats[j] is not None and grid_h[j] and grid_w[j]:
                d["grid"] = [int(grid_h[j]), int(grid_w[j])]
                break
        start = a
        for j in range(a, b + 1):  # rows are ordered by scope within a feature
            if j == b or scopes[j] != scopes[start]:
                d["top"][scopes[start]] = {**{k: v[start:j] for k, v in cols.items()}, "heat": heats[start:j]}
                start = j


def _spans(table: pa.Table) -> list[Span]:
    """Each run of equal feature ids (the queries order rows by feature)."""
    if not table.num_rows:
        return []
    fids = table.column("feature_id").to_numpy()
    cuts = np.flatnonzero(np.diff(fids)) + 1
    starts = np.concatenate([[0], cuts]).tolist()
    stops = np.concatenate([cuts, [len(fids)]]).tolist()
    return [Span(int(fids[a]), a, b) for a, b in zip(starts, stops, strict=True)]


def _quantised_heatmaps(top: pa.Table, spans: list[Span]) -> tuple[list[str | None], np.ndarray]:
    """Every row's heatmap as base64 uint8 (0..255 of its feature's largest patch value, so images of
    one feature compare), and that largest value per row."""
    heat = top.column("heatmap").combine_chunks()
    values = heat.values.to_numpy(zero_copy_only=False).astype(np.float32)
    offsets = heat.offsets.to_numpy().astype(np.int64)
    values = values[:offsets[-1]]  # a sliced array's child may run past its last row
    valid = ~heat.is_null().to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)
    row_max = np.zeros(len(lengths), np.float32)
    filled = np.flatnonzero(valid & (lengths > 0))
    row_max[filled] = np.maximum.reduceat(values, offsets[filled])  # offsets of non-empty rows only
    peaks = np.zeros(len(lengths), np.float64)
    for _, a, b in spans:
        peaks[a:b] = max(float(row_max[a:b].max()), 0.0)
    scale = np.where(peaks > 0, 255.0 / np.where(peaks > 0, peaks, 1.0), 0.0)
    per_value = np.repeat(scale, lengths)  # each value's row scale
    q = np.clip(np.rint(values[offsets[0]:offsets[-1]] * per_value), 0, 255).astype(np.uint8)
    base = offsets[0]
    out: list[str | None] = [
        base64.b64encode(q[offsets[j] - base:offsets[j + 1] - base].tobytes()).decode("ascii")
        if valid[j] else None
        for j in range(len(lengths))
    ]
    return out, peaks


def _trim_histogram(counts: list | None, edges: list | None) -> dict[str, Any] | None:
    """Drop empty bins at both ends (the feature pass uses one wide fixed binning for every latent)."""
    if not counts or not edges or len(edges) != len(counts) + 1:
        return None
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return {"counts": [], "edges": []}
    a, b = nz[0], nz[-1] + 1
    return {"counts": [json_number(c) for c in counts[a:b]],
            "edges": [json_number(e) for e in edges[a:b + 1]]}
