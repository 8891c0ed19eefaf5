"""The feature browser as a static site: HTML + JS shells, JSON data and PNG images, built from the warehouse.

Layout written under ``out_dir`` (default ``<warehouse root>/dashboard``; see docs/DASHBOARD.md)::

    index.html sae.html feature.html sample.html   the pages (static/shell.html, one per page), and the
    edits.html                                     scripts and style sheet they load (copied from static/)
    dom.js charts.js findings.js app.js style.css
    data/site.json                            runs, classes, SAEs with metrics per step: the overview
    data/sae/<slug>/features.json             one SAE's feature list, column-wise (sorted client-side)
    data/sae/<slug>/f/<chunk>.json            CHUNK features' details: per-step curves, concepts,
                                              histogram, top images with heatmaps, neighbours, edits
    data/samples/<run slug>/<block>.json      SAMPLE_BLOCK samples: provenance and the features they top
    data/edits.json                           every edit with its samples' verdicts and images (if any)
    img/<run slug>/<sample_id>.png            the generated images
    img/edits/<edit_id>/<sample>-{before,after}.png  each edit's images, copied from the warehouse

Pages are static shells that fetch JSON and render with DOM text nodes, so nothing from the warehouse
is ever parsed as HTML. A feature page fetches one small chunk file, so the site stays fast however
many features an SAE has. The site is built in a temporary folder and swapped in whole: a server
never shows half a build, and building holds the DuckDB file only for short reads (see data.py).

This module runs the build; ``runs`` writes each run's part, ``saes`` each SAE's, ``writer`` the files
and the JSON values in them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from dashboards.data import MetricSeries, RunInfo, SaeInfo, WarehouseReader
from dashboards.edits import write_edits
from dashboards.errors import DashboardError
from dashboards.runs import SAMPLE_BLOCK, Tops, collect_tops, run_doc, write_run_images, write_sample_blocks
from dashboards.saes import CHUNK, feature_list_doc, sae_doc, write_feature_chunks
from dashboards.writer import SiteWriter, slugs, swap_in

__all__ = ["CHUNK", "DashboardError", "SaeSummary", "SiteReport", "build_site", "default_site_dir"]

SITE_VERSION = 1
STATIC_DIR = Path(__file__).resolve().parent / "static"
# The pages: one shell (static/shell.html) each, differing only in the page app.js renders and the title.
# Every shell loads dom.js, charts.js, findings.js, app.js in that order: each uses the names the ones
# before it define.
PAGES = {"index.html": ("overview", "Overview"), "sae.html": ("sae", "Features"), "feature.html": ("feature", "Feature"),
         "sample.html": ("sample", "Sample"), "edits.html": ("edits", "Edits")}
ASSETS = ("dom.js", "charts.js", "findings.js", "app.js", "style.css")  # copied as they are

Log = Callable[[str], None]


@dataclass(frozen=True)
class SaeSummary:
    """What the Dagster asset plots of one SAE (also in data/site.json)."""

    sae_id: str
    slug: str
    layer: int
    site: str
    variant: str
    n_features: int
    heldout: MetricSeries | None
    fire_rate: np.ndarray  # per feature (empty while the feature pass has not run)
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


@dataclass(frozen=True)
class _Built:
    """What writing the site's files gave, beyond the files themselves."""

    n_images: int
    warnings: list[str]
    saes: list[SaeSummary]


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
        raise DashboardError(f"the warehouse {warehouse_path} has no runs yet: "
                             "capture one first (`tide run`)")

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    w = SiteWriter(tmp)
    try:
        built = _build(w, reader, runs, saes, store_urls or {}, warehouse_path.parent, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves the old site, and no debris
        raise
    swap_in(tmp, out)
    report = SiteReport(out_dir=out, n_runs=len(runs), n_saes=len(saes),
                        n_features=sum(s.n_features for s in saes), n_images=built.n_images,
                        n_files=w.files, bytes=w.bytes, seconds=time.perf_counter() - t0,
                        warnings=tuple(built.warnings), saes=tuple(built.saes))
    log(f"[dashboard] wrote {report.n_files} files ({report.bytes / 1e6:.1f} MB) to {out} "
        f"in {report.seconds:.1f}s")
    for text in report.warnings:
        log(f"[dashboard] warning: {text}")
    return report


def _build(w: SiteWriter, reader: WarehouseReader, runs: list[RunInfo], saes: list[SaeInfo],
           store_urls: Mapping[str, str], root: Path, log: Log) -> _Built:
    """Write every file of the site: pages, each run's images, each SAE's files, samples, edits, site.json.
    ``root``: the warehouse root, which the edits' image paths are relative to."""
    shell = (STATIC_DIR / "shell.html").read_text()
    for name, (page, title) in PAGES.items():  # page and title are ours, never warehouse text
        w.write_bytes(name, shell.replace("{page}", page).replace("{title}", title).encode())
    for name in ASSETS:
        w.write_bytes(name, (STATIC_DIR / name).read_bytes())
    warnings: list[str] = []
    run_slugs = slugs([r.run_id for r in runs])
    sae_slugs = slugs([s.sae_id for s in saes])
    metrics, splice, probes = reader.metrics(), reader.splice(), reader.factor_probes()
    edits = write_edits(w, reader.edits(), root)
    warnings += edits.warnings

    samples = {run.run_id: reader.samples(run.run_id) for run in runs}
    run_docs, n_images = [], 0
    for run in runs:
        slug, url = run_slugs[run.run_id], store_urls.get(run.run_id) or run.store_url
        images = write_run_images(w, slug, samples[run.run_id], url)
        if images.error:
            warnings.append(f"run {run.run_id}: {images.error}")
        else:
            log(f"[dashboard] run {run.run_id}: {images.written} images from {url}")
        run_docs.append(run_doc(run, slug, samples[run.run_id], images))
        n_images += images.written

    tops: dict[str, Tops] = {}  # per run
    summaries = []
    for sae in saes:
        slug = sae_slugs[sae.sae_id]
        log(f"[dashboard] {sae.sae_id}: {sae.n_features} features")
        listing = reader.feature_list(sae.sae_id)
        w.write_json(f"data/sae/{slug}/features.json", feature_list_doc(sae, listing))
        write_feature_chunks(w, reader, sae, slug, edits.by_feature)
        collect_tops(tops.setdefault(sae.run_id, {}), reader.appearances(sae.sae_id), sae.sae_id)
        summaries.append(SaeSummary(
            sae_id=sae.sae_id, slug=slug, layer=sae.layer, site=sae.site, variant=sae.variant,
            n_features=sae.n_features,
            heldout=metrics.get(sae.sae_id, {}).get("heldout"),
            fire_rate=_floats(listing, "fire_rate"), peak_step=_floats(listing, "peak_step")))

    for run in runs:
        write_sample_blocks(w, run, samples[run.run_id], run_slugs[run.run_id], tops.get(run.run_id, {}))

    w.write_json("data/site.json", {
        "version": SITE_VERSION,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "chunk": CHUNK,
        "sample_block": SAMPLE_BLOCK,
        "runs": run_docs,
        "saes": [sae_doc(s, sae_slugs[s.sae_id], metrics.get(s.sae_id, {}), splice.get(s.sae_id, {}),
                         probes.get(s.sae_id)) for s in saes],
        "n_edits": edits.n_edits,
        "warnings": warnings,
    })
    return _Built(n_images=n_images + edits.n_images, warnings=warnings, saes=summaries)


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """A column as floats (NULL as NaN); empty when the table lacks it."""
    if name not in table.column_names:
        return np.zeros(0)
    return table.column(name).to_numpy(zero_copy_only=False).astype(float)
