"""One run's part of the site: its entry in site.json, its images and its sample files.

Images come from the run's activation store, opened read-only; a store that cannot be opened costs the
site its images (with the reason on the pages and in the build report), never the build. The sample
files carry each sample's provenance and the features that rank it among their top images.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from dashboards.data import RunInfo
from dashboards.errors import DashboardError
from dashboards.png import downscale, encode_png
from dashboards.writer import SiteWriter, json_column, json_value

SAMPLE_BLOCK = 64  # samples per sample-page file
MAX_APPEARANCES = 24  # features listed per sample and SAE on the sample page (best ranks first)
GRID_SAMPLES = 40  # images in the overview's sample grid
IMAGE_MAX_SIDE = 256  # larger images are shrunk by an integer factor before encoding

# sample id -> sae_id -> [[feature, rank, step, activation], ...]: one run's top-image appearances
Tops = dict[int, dict[str, list[list[Any]]]]


@dataclass(frozen=True)
class RunImages:
    """What came of writing one run's images, with the capture timesteps its store records."""

    written: int
    timesteps: list[int] | None
    error: str = ""  # why the store could not be read ("" when it could)
    sigmas: list[float] | None = None  # flow matching: the model's own time of each captured step

    @property
    def available(self) -> bool:
        return self.written > 0 and not self.error

    def doc(self) -> dict[str, Any]:
        reason = self.error or ("" if self.written else "the store holds none of the samples")
        return {"available": self.available, "reason": reason}


def write_run_images(w: SiteWriter, slug: str, samples: pa.Table, store_url: str | None) -> RunImages:
    """One PNG per sample of the run that the store holds, under img/<slug>/."""
    timesteps = sigmas = None
    try:
        store = _open_store(store_url)
        provenance = store.provenance
        timesteps = [int(t) for t in provenance.get("capture_timesteps")
                     or provenance.get("sampling", {}).get("timesteps") or []] or None
        sigmas = provenance.get("capture_sigmas")
        written = _write_images(w, store, slug, samples.column("sample_id").to_numpy())
    except Exception as exc:  # the site is still useful without images; say why they are missing
        return RunImages(written=0, timesteps=timesteps, error=f"images unavailable: {exc}", sigmas=sigmas)
    return RunImages(written=written, timesteps=timesteps, sigmas=sigmas)


def run_doc(run: RunInfo, slug: str, samples: pa.Table, images: RunImages) -> dict[str, Any]:
    """The run's entry in site.json: provenance, classes, config, and the overview's sample grid."""
    cfg = run.config
    sample_ids = samples.column("sample_id").to_numpy()
    return {
        "run_id": run.run_id, "slug": slug, "model_source": run.model_source,
        "code_version": run.code_version, "created_at": run.created_at, "n_samples": run.n_samples,
        "sample_ids": [int(sample_ids.min()), int(sample_ids.max())] if len(sample_ids) else None,
        "classes": [{"class_id": c.class_id, "class_name": c.class_name, "n_samples": c.n_samples}
                    for c in run.classes],
        "judge_classes": list(run.judge_classes) if run.judge_classes is not None else None,
        "model": cfg.get("model", {}), "sampling": cfg.get("sampling", {}), "capture": cfg.get("capture", {}),
        "sae": cfg.get("sae", {}), "config": cfg, "timesteps": images.timesteps, "sigmas": images.sigmas,
        "image": images.doc(),
        "grid": _sample_grid(samples, GRID_SAMPLES) if images.available else [],
    }


def _sample_grid(samples: pa.Table, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` samples (id, class) for the overview: the first of every class, then the second, ...

    ``samples`` comes ordered by sample id, so counting per class while walking it gives each sample's
    place in its class; a sample past the ``limit``-th of its class can never be shown.
    """
    seen: Counter[int] = Counter()
    ranked = []
    for r in samples.select(["sample_id", "class_id", "class_name"]).to_pylist():
        seen[r["class_id"]] += 1
        if seen[r["class_id"]] <= limit:
            ranked.append((seen[r["class_id"]], r["class_id"], r))
    ranked.sort(key=lambda t: t[:2])  # class_id is NOT NULL, so the keys always compare
    return [r for _, _, r in ranked[:limit]]


def _open_store(url: str | None):
    from storage import ActivationStore  # here, not at the top: the warehouse readers never import zarr

    if not url:
        raise DashboardError("the run records no activation-store URL")
    return ActivationStore.open(url, mode="r")


def _write_images(w: SiteWriter, store, slug: str, sample_ids: np.ndarray) -> int:
    """Read the store a shard at a time (its natural read unit) and write the wanted samples of each."""
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


# ------------------------------------------------------------------------------------- samples


def collect_tops(tops: Tops, table: pa.Table, sae_id: str) -> None:
    """Add one SAE's top-image rows (``WarehouseReader.appearances``) to ``tops``.

    A feature that tops an image in both scopes is listed once (its best rank); at most
    MAX_APPEARANCES per sample and SAE, best ranks first, so the sample files stay small on big runs.
    """
    if not table.num_rows:
        return
    sid = table.column("sample_id").to_numpy()
    fid = table.column("feature_id").to_numpy()
    rank, step, act = (json_column(table.column(c)) for c in ("rank", "step", "activation"))
    # rows come ordered by sample, rank, activation desc: the first row of a (sample, feature) is its best
    _, first = np.unique(sid.astype(np.int64) * (int(fid.max()) + 1) + fid, return_index=True)
    first.sort()
    s = sid[first]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(s)) + 1])
    position = np.arange(len(s)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(s)]])))
    for j in first[position < MAX_APPEARANCES].tolist():
        listed = tops.setdefault(int(sid[j]), {}).setdefault(sae_id, [])
        listed.append([int(fid[j]), rank[j], step[j], act[j]])


def write_sample_blocks(w: SiteWriter, run: RunInfo, samples: pa.Table, slug: str, tops: Tops) -> None:
    """data/samples/<slug>/<id // SAMPLE_BLOCK>.json: each sample's row and its top-image appearances."""
    blocks: dict[int, dict[str, Any]] = {}
    for r in samples.to_pylist():
        sid = int(r["sample_id"])
        blocks.setdefault(sid // SAMPLE_BLOCK, {})[str(sid)] = {**json_value(r), "top": tops.get(sid, {})}
    for b, docs in blocks.items():
        w.write_json(f"data/samples/{slug}/{b}.json", {"run_id": run.run_id, "samples": docs})
