"""The feature browser as a static site: HTML + JS shells, JSON data and PNG images, built from the warehouse.

Layout written under ``out_dir`` (default ``<warehouse root>/dashboard``; see docs/DASHBOARD.md)::

    index.html sae.html feature.html sample.html app.js style.css    the pages (copied from static/)
    data/site.json                            runs, classes, SAEs with metrics per step: the overview
    data/sae/<slug>/features.json             one SAE's feature list, column-wise (sorted client-side)
    data/sae/<slug>/f/<chunk>.json            CHUNK features' details: per-step curves, classes,
                                              histogram, top images with heatmaps, neighbours, edits
    data/samples/<run slug>/<block>.json      SAMPLE_BLOCK samples: provenance and the features they top
    img/<run slug>/<sample_id>.png            the generated images

Pages are static shells that fetch JSON and render with DOM text nodes, so nothing from the warehouse
is ever parsed as HTML. A feature page fetches one small chunk file, so the site stays fast however
many features an SAE has. The site is built in a temporary folder and swapped in whole: a server
never shows half a build, and building never holds the DuckDB file longer than one query.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dashboards.data import FeatureBlock, MetricSeries, RunInfo, SaeInfo, WarehouseReader
from dashboards.png import downscale, encode_png

SITE_VERSION = 1
CHUNK = 16  # features per detail file: one fetch per feature page, ~16x fewer files than one per feature
READ_BLOCK = 1024  # features per warehouse read (bounds memory: heatmaps of 16k features would not fit)
SAMPLE_BLOCK = 64  # samples per sample-page file
MAX_APPEARANCES = 24  # features listed per sample and SAE on the sample page (best ranks first)
GRID_SAMPLES = 40  # images in the overview's sample grid
IMAGE_MAX_SIDE = 256  # larger images are shrunk by an integer factor before encoding
SIG_DIGITS = 5  # significant digits kept for floats in the JSON (the tables keep full precision)
STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGES = ("index.html", "sae.html", "feature.html", "sample.html", "app.js", "style.css")

Log = Callable[[str], None]


class DashboardError(RuntimeError):
    """The site cannot be built as asked; the message says what to do."""


@dataclass(frozen=True)
class SaeSummary:
    """What the Dagster asset plots of one SAE (also in data/site.json)."""

    sae_id: str
    slug: str
    layer: int
    variant: str
    n_features: int
    heldout: MetricSeries | None
    fire_rate: np.ndarray  # per feature (empty before the feature pass)
    peak_step: np.ndarray


@dataclass(frozen=True)
class SiteReport:
    out_dir: Path
    n_runs: int
    n_saes: int
    n_features: int
    n_images: int
    n_files: int
    bytes: int
    seconds: float
    warnings: tuple[str, ...]
    saes: tuple[SaeSummary, ...]


def default_site_dir(warehouse_path: str | Path) -> Path:
    return Path(warehouse_path).resolve().parent / "dashboard"


def build_site(warehouse_path: str | Path, out_dir: str | Path | None = None, *,
               store_urls: Mapping[str, str] | None = None, log: Log = print) -> SiteReport:
    """Build the whole site from the warehouse at ``warehouse_path`` and swap it into ``out_dir``.

    ``store_urls`` maps run_id -> activation-store URL for the images; runs not in it use the URL
    recorded in their ``runs.config_json``. A run whose store cannot be opened gets a warning and
    pages without images, not a failed build.
    """
    t0 = time.perf_counter()
    warehouse_path = Path(warehouse_path)
    out = Path(out_dir) if out_dir is not None else default_site_dir(warehouse_path)
    reader = WarehouseReader(warehouse_path)
    if not reader.wh.exists():
        raise DashboardError(f"no warehouse at {warehouse_path}: run the pipeline first (`tide run`), "
                             "or pass the path of an existing warehouse.duckdb")
    runs, saes = reader.runs(), reader.saes()
    if not runs:
        raise DashboardError(f"the warehouse {warehouse_path} has no runs yet: capture one first (`tide run`)")

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    w = _Writer(tmp)
    try:
        n_images, warnings, summaries = _build(w, reader, runs, saes, warehouse_path, store_urls or {}, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves the old site, and no debris
        raise
    _swap_in(tmp, out)
    report = SiteReport(out_dir=out, n_runs=len(runs), n_saes=len(saes), n_features=sum(s.n_features for s in saes),
                        n_images=n_images, n_files=w.files, bytes=w.bytes, seconds=time.perf_counter() - t0,
                        warnings=tuple(warnings), saes=tuple(summaries))
    log(f"[dashboard] wrote {report.n_files} files ({report.bytes / 1e6:.1f} MB) to {out} in {report.seconds:.1f}s")
    for text in report.warnings:
        log(f"[dashboard] warning: {text}")
    return report


def _build(w: _Writer, reader: WarehouseReader, runs: list[RunInfo], saes: list[SaeInfo], warehouse_path: Path,
           store_urls: Mapping[str, str], log: Log) -> tuple[int, list[str], list[SaeSummary]]:
    """Write every file of the site; returns (images written, warnings, per-SAE summaries)."""
    for name in PAGES:
        w.write_bytes(name, (STATIC_DIR / name).read_bytes())
    warnings: list[str] = []
    run_slugs = _slugs([r.run_id for r in runs])
    sae_slugs = _slugs([s.sae_id for s in saes])
    metrics, splice = reader.metrics(), reader.splice()
    edits = _edits_by_feature(reader.edits())

    samples = {run.run_id: reader.samples(run.run_id) for run in runs}
    run_docs, n_images = [], 0
    for run in runs:
        doc, n = _write_run(w, reader, run, samples[run.run_id], run_slugs[run.run_id], store_urls.get(run.run_id),
                            warnings, log)
        run_docs.append(doc)
        n_images += n

    tops: dict[str, dict[int, dict[str, list]]] = {}  # run -> sample -> sae -> [[feature, rank, step, act]]
    summaries = []
    for sae in saes:
        slug = sae_slugs[sae.sae_id]
        log(f"[dashboard] {sae.sae_id}: {sae.n_features} features")
        listing = reader.feature_list(sae.sae_id)
        w.write_json(f"data/sae/{slug}/features.json", _feature_list_doc(sae, listing))
        _write_feature_chunks(w, reader, sae, slug, edits)
        _collect_tops(tops.setdefault(sae.run_id, {}), reader.appearances(sae.sae_id), sae.sae_id)
        summaries.append(SaeSummary(
            sae_id=sae.sae_id, slug=slug, layer=sae.layer, variant=sae.variant, n_features=sae.n_features,
            heldout=metrics.get(sae.sae_id, {}).get("heldout"),
            fire_rate=_np(listing, "fire_rate"), peak_step=_np(listing, "peak_step")))

    for run in runs:
        _write_sample_blocks(w, run, samples[run.run_id], run_slugs[run.run_id], tops.get(run.run_id, {}))

    w.write_json("data/site.json", {
        "version": SITE_VERSION,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "warehouse": str(warehouse_path.resolve()),
        "warehouse_mtime": warehouse_path.stat().st_mtime,
        "chunk": CHUNK,
        "sample_block": SAMPLE_BLOCK,
        "runs": run_docs,
        "saes": [_sae_doc(s, sae_slugs[s.sae_id], run_slugs.get(s.run_id), metrics.get(s.sae_id, {}),
                          splice.get(s.sae_id, {})) for s in saes],
        "edits": sum(len(v) for v in edits.values()),
        "warnings": warnings,
    })
    return n_images, warnings, summaries


# ----------------------------------------------------------------------------------------- runs


def _write_run(w: _Writer, reader: WarehouseReader, run: RunInfo, samples: pa.Table, slug: str,
               store_url: str | None, warnings: list[str], log: Log) -> tuple[dict[str, Any], int]:
    url = store_url or run.store_url
    image: dict[str, Any] = {"available": False, "reason": "", "shape": None}
    timesteps: list[int] | None = None
    n = 0
    sample_ids = samples.column("sample_id").to_numpy()
    try:
        store = _open_store(url)
        timesteps = [int(t) for t in store.provenance.get("capture_timesteps")
                     or store.provenance.get("sampling", {}).get("timesteps") or []] or None
        n = _write_images(w, store, slug, sample_ids)
        image = {"available": n > 0, "reason": "" if n else "the store holds none of the samples",
                 "shape": list(store.layout.image_shape)}
        log(f"[dashboard] run {run.run_id}: {n} images from {url}")
    except Exception as exc:  # the site is still useful without images; say why they are missing
        image["reason"] = f"images unavailable: {exc}"
        warnings.append(f"run {run.run_id}: {image['reason']}")
    cfg = run.config
    return {
        "run_id": run.run_id, "slug": slug, "model_source": run.model_source, "code_version": run.code_version,
        "created_at": run.created_at, "store_url": url, "n_samples": run.n_samples,
        "sample_ids": _id_range(sample_ids),
        "classes": [{"class_id": c.class_id, "class_name": c.class_name, "n_samples": c.n_samples}
                    for c in run.classes],
        "model": cfg.get("model", {}), "sampling": cfg.get("sampling", {}), "capture": cfg.get("capture", {}),
        "sae": cfg.get("sae", {}), "config": cfg, "timesteps": timesteps, "image": image,
        "grid": reader.sample_grid(run.run_id, GRID_SAMPLES) if image["available"] else [],
    }, n


def _id_range(ids: np.ndarray) -> list[int] | None:
    return [int(ids.min()), int(ids.max())] if len(ids) else None


def _open_store(url: str | None):
    from storage.activation_store import ActivationStore

    if not url:
        raise DashboardError("the run records no activation-store URL")
    return ActivationStore.open(url, mode="r")


def _write_images(w: _Writer, store, slug: str, sample_ids: np.ndarray) -> int:
    n_store = store.layout.num_samples
    wanted = np.unique(sample_ids[(sample_ids >= 0) & (sample_ids < n_store)])
    block = max(1, store.layout.shard_size)
    written = 0
    for start in range(0, n_store, block):
        ids = wanted[(wanted >= start) & (wanted < start + block)]
        if not len(ids):
            continue
        images = store.images(start, min(start + block, n_store))
        for sid in ids.tolist():
            w.write_bytes(f"img/{slug}/{sid}.png", encode_png(downscale(images[sid - start], IMAGE_MAX_SIDE)))
            written += 1
    return written


def _collect_tops(tops: dict[int, dict[str, list]], table: pa.Table, sae_id: str) -> None:
    """Add one SAE's top-image rows to sample -> sae -> [[feature, rank, step, activation]].

    A feature that tops an image in both scopes is listed once (its best rank); at most
    MAX_APPEARANCES per sample and SAE, best ranks first, so the sample files stay small on big runs.
    """
    if not table.num_rows:
        return
    sid = table.column("sample_id").to_numpy()
    fid = table.column("feature_id").to_numpy()
    rank, step, act = (_column(table.column(c)) for c in ("rank", "step", "activation"))
    # rows come ordered by sample, rank, activation desc: the first row of a (sample, feature) is its best
    _, first = np.unique(sid.astype(np.int64) * (int(fid.max()) + 1) + fid, return_index=True)
    first.sort()
    s = sid[first]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(s)) + 1])
    position = np.arange(len(s)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(s)]])))
    for j in first[position < MAX_APPEARANCES].tolist():
        tops.setdefault(int(sid[j]), {}).setdefault(sae_id, []).append([int(fid[j]), rank[j], step[j], act[j]])


def _write_sample_blocks(w: _Writer, run: RunInfo, samples: pa.Table, slug: str,
                         tops: dict[int, dict[str, list]]) -> None:
    blocks: dict[int, dict[str, Any]] = {}
    for r in samples.to_pylist():
        sid = int(r["sample_id"])
        blocks.setdefault(sid // SAMPLE_BLOCK, {})[str(sid)] = {**_clean(r), "top": tops.get(sid, {})}
    for b, docs in blocks.items():
        w.write_json(f"data/samples/{slug}/{b}.json", {"run_id": run.run_id, "samples": docs})


# ---------------------------------------------------------------------------------------- SAEs


def _sae_doc(sae: SaeInfo, slug: str, run_slug: str | None, metrics: dict[str, MetricSeries],
             splice: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def series(m: MetricSeries) -> dict[str, Any]:
        values = {k: [_num(v) for v in vs] for k, vs in m.values.items()}
        dead = m.values.get("dead_fraction", [])
        values["live_features"] = [None if d is None else round(sae.n_latents * (1 - d)) for d in dead]
        return {"steps": m.steps, "values": values, "overall": _clean(m.overall)}

    return {
        "sae_id": sae.sae_id, "slug": slug, "run_id": sae.run_id, "run_slug": run_slug, "layer": sae.layer,
        "site": sae.site, "variant": sae.variant, "n_latents": sae.n_latents, "k": sae.k,
        "tokens_seen": sae.tokens_seen, "n_features": sae.n_features,
        "metrics": {split: series(m) for split, m in metrics.items()},
        "splice": _clean(splice),
    }


def _feature_list_doc(sae: SaeInfo, listing: pa.Table) -> dict[str, Any]:
    """Column-wise (one array per column): a third of the size of row objects, and what the JS sorts."""
    columns = {name: _column(listing.column(name)) for name in listing.column_names
               if name != "sae_id" and not pa.types.is_nested(listing.schema.field(name).type)}  # lists: feature page
    return {"sae_id": sae.sae_id, "n": listing.num_rows, "columns": columns}


def _write_feature_chunks(w: _Writer, reader: WarehouseReader, sae: SaeInfo, slug: str,
                          edits: dict[tuple[str, int], list[dict[str, Any]]]) -> None:
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


def _feature_details(block: FeatureBlock) -> dict[int, dict[str, Any]]:
    """feature_id -> everything its page shows, from one block of rows.

    Per-feature tables are column-wise ({column: [values]}, rows ordered by step, class or rank): each
    column is converted to JSON values once for the whole block and then sliced per feature, which keeps
    a 16k-feature SAE to seconds.
    """
    docs: dict[int, dict[str, Any]] = {}

    def doc(fid: int) -> dict[str, Any]:
        return docs.setdefault(fid, {"stats": {}, "hist": None, "steps": {}, "classes": {}, "top": {},
                                     "grid": None, "heat_max": None, "neighbors": {}, "edits": []})

    feats = block.features
    stats = _json_columns(feats, {"sae_id", "feature_id", "histogram", "histogram_edges"})
    hist = feats.column("histogram").to_pylist() if "histogram" in feats.column_names else []
    edges = feats.column("histogram_edges").to_pylist() if "histogram_edges" in feats.column_names else []
    for i, fid in enumerate(feats.column("feature_id").to_pylist()):
        d = doc(fid)
        d["stats"] = {k: v[i] for k, v in stats.items()}
        d["hist"] = _trim_histogram(hist[i] if hist else None, edges[i] if edges else None)
    for key, table in (("steps", block.steps), ("classes", block.classes), ("neighbors", block.neighbors)):
        cols = _json_columns(table, _DETAIL_DROP)
        for fid, a, b in _runs(table):
            doc(fid)[key] = {k: v[a:b] for k, v in cols.items()}
    _add_top_images(block.top, doc)
    return docs


def _add_top_images(top: pa.Table, doc: Callable[[int], dict[str, Any]]) -> None:
    """Top images per scope (column-wise); heatmaps as base64 uint8 scaled by the feature's largest patch."""
    if not top.num_rows:
        return
    runs = _runs(top)
    heats, peaks = _quantised_heatmaps(top, runs)
    cols = _json_columns(top, _DETAIL_DROP)
    scopes = top.column("scope").to_pylist()
    grid_h, grid_w = top.column("grid_h").to_pylist(), top.column("grid_w").to_pylist()
    for fid, a, b in runs:
        d = doc(fid)
        d["heat_max"] = _num(peaks[a])
        for j in range(a, b):
            if heats[j] is not None and grid_h[j] and grid_w[j]:
                d["grid"] = [int(grid_h[j]), int(grid_w[j])]
                break
        start = a
        for j in range(a, b + 1):  # rows are ordered by scope within a feature
            if j == b or scopes[j] != scopes[start]:
                d["top"][scopes[start]] = {**{k: v[start:j] for k, v in cols.items()}, "heat": heats[start:j]}
                start = j


def _runs(table: pa.Table) -> list[tuple[int, int, int]]:
    """(feature_id, start, stop) of each run of equal feature ids (queries order rows by feature)."""
    if not table.num_rows:
        return []
    fids = table.column("feature_id").to_numpy()
    cuts = np.flatnonzero(np.diff(fids)) + 1
    starts = np.concatenate([[0], cuts]).tolist()
    stops = np.concatenate([cuts, [len(fids)]]).tolist()
    return [(int(fids[a]), a, b) for a, b in zip(starts, stops, strict=True)]


def _quantised_heatmaps(top: pa.Table, runs: list[tuple[int, int, int]]) -> tuple[list[str | None], np.ndarray]:
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
    for _, a, b in runs:
        peaks[a:b] = max(float(row_max[a:b].max()), 0.0)
    scale = np.where(peaks > 0, 255.0 / np.where(peaks > 0, peaks, 1.0), 0.0)
    per_value = np.repeat(scale, lengths)  # each value's row scale
    q = np.clip(np.rint(values[offsets[0]:offsets[-1]] * per_value), 0, 255).astype(np.uint8)
    base = offsets[0]
    out: list[str | None] = [
        base64.b64encode(q[offsets[j] - base:offsets[j + 1] - base].tobytes()).decode("ascii") if valid[j] else None
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
    return {"counts": [_num(c) for c in counts[a:b]], "edges": [_num(e) for e in edges[a:b + 1]]}


def _edits_by_feature(rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        item = _clean({k: v for k, v in r.items() if k not in ("config_json", "sae_id")})
        for fid in r.get("feature_ids") or []:
            out.setdefault((r["sae_id"], int(fid)), []).append(item)
    return out


# ----------------------------------------------------------------------------------- plumbing


class _Writer:
    """Writes files under the build folder and counts them."""

    def __init__(self, root: Path):
        self.root = root
        self.files = 0
        self.bytes = 0
        root.mkdir(parents=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files += 1
        self.bytes += len(data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, separators=(",", ":"), allow_nan=False).encode())


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished build; the old site disappears only once the new one is complete."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _slugs(ids: list[str]) -> dict[str, str]:
    """id -> a file-name-safe, unique slug (ids are data, never trusted as paths)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for i in ids:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", i).strip(".")[:80] or "x"
        slug, n = base, 1
        while slug.lower() in used:
            n += 1
            slug = f"{base}-{n}"
        used.add(slug.lower())
        out[i] = slug
    return out


_JS_SAFE_INT = 2**53  # JavaScript numbers hold integers exactly up to here; larger ones (seeds) go as text


def _num(v: Any) -> Any:
    """A JSON-safe number with SIG_DIGITS significant digits; NaN and inf become null."""
    if isinstance(v, np.integer):
        v = int(v)
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v if abs(v) < _JS_SAFE_INT else str(v)
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return float(f"{v:.{SIG_DIGITS}g}") if math.isfinite(v) else None
    return v


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | np.generic):
        return _num(value)
    return value if isinstance(value, str) else str(value)


def _json_columns(table: pa.Table, drop: set[str] | frozenset[str] = frozenset()) -> dict[str, list[Any]]:
    return {name: _column(table.column(name)) for name in table.column_names if name not in drop}


def _column(col: pa.ChunkedArray) -> list[Any]:
    """One Arrow column as JSON-ready Python values, vectorised: floats to SIG_DIGITS significant digits,
    NaN/inf/NULL to None, integers exact, strings as they are, anything nested through _clean."""
    t = col.type
    if pa.types.is_floating(t) or pa.types.is_integer(t):
        arr = col.to_numpy(zero_copy_only=False)  # NULLs become NaN (integers with NULLs become floats)
        missing = ~np.isfinite(arr.astype(np.float64)) if arr.dtype.kind == "f" else np.zeros(len(arr), bool)
        if pa.types.is_integer(t):
            ints = np.where(missing, 0, arr).astype(np.int64)
            out = ints.tolist()
            for i in np.flatnonzero(np.abs(ints) >= _JS_SAFE_INT).tolist():
                out[i] = str(out[i])
        else:
            out = _round_sig(np.where(missing, 0.0, arr.astype(np.float64))).tolist()
        for i in np.flatnonzero(missing).tolist():
            out[i] = None
        return out
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t):
        return col.to_pylist()
    return [_clean(v) for v in col.to_pylist()]


def _round_sig(x: np.ndarray, sig: int = SIG_DIGITS) -> np.ndarray:
    """Round to ``sig`` significant digits so the JSON holds short numbers (0.12346, not 0.123456789...).

    Dividing an integer by an exact power of ten gives the double nearest the short decimal, which is
    what Python's repr then prints.
    """
    out = x.copy()
    nz = np.flatnonzero(x != 0)
    if not len(nz):
        return out
    v = x[nz]
    d = np.clip(sig - 1 - np.floor(np.log10(np.abs(v))).astype(np.int64), -22, 22)  # 10**22 is exact
    scale = 10.0 ** np.abs(d)
    out[nz] = np.where(d >= 0, np.round(v * scale) / scale, np.round(v / scale) * scale)
    return out


def _np(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.zeros(0)
    return table.column(name).to_numpy(zero_copy_only=False).astype(float)
