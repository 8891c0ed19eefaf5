"""What the feature browser reads from the warehouse: typed records and Arrow tables, from the views.

Every read is a short read-only query (or a block of them on one connection) through
``storage.Warehouse``, which retries while a writer holds the file, so building the site
can interleave with a running pipeline. Values reach DuckDB as parameters only. The per-feature
tables are read in blocks of feature ids so that an SAE with 16k+ latents and heatmaps never sits
in memory whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from storage import OVERALL_STEP, SAE_CONTEXT, SaeRecord, Warehouse

# Columns the v_* views add from `saes`; the site carries them once per SAE, not once per row.
_EXCLUDE_CONTEXT = "EXCLUDE (" + ", ".join(SAE_CONTEXT) + ")"
METRICS = ("mse", "nmse", "cosine", "explained_variance", "l0", "dead_fraction", "dense_fraction")


@dataclass(frozen=True)
class ClassInfo:
    class_id: int
    class_name: str | None
    n_samples: int


@dataclass(frozen=True)
class RunInfo:
    """One ``runs`` row with the parts of its config the overview shows, and its classes."""

    run_id: str
    model_source: str | None
    code_version: str | None
    created_at: str
    config: dict[str, Any]
    store_url: str | None
    n_samples: int
    classes: tuple[ClassInfo, ...]
    judge_classes: tuple[str, ...] | None = None  # what judge_pred means (a text run's classes are prompts)


@dataclass(frozen=True)
class SaeInfo(SaeRecord):
    """One ``saes`` row plus how many ``features`` rows it has (0 until the feature pass ran)."""

    n_features: int


@dataclass(frozen=True)
class MetricSeries:
    """One SAE on one split: each metric per step (ascending) and over all steps."""

    split: str
    steps: list[int]
    values: dict[str, list[float | None]]
    overall: dict[str, float | None]


@dataclass(frozen=True)
class FeatureBlock:
    """Every per-feature row of one SAE for feature ids in [lo, hi), ordered by feature then step/rank."""

    sae_id: str
    lo: int
    hi: int
    features: pa.Table  # v_features, one row per feature
    steps: pa.Table  # v_feature_stats, one row per (feature, step)
    concepts: pa.Table  # v_feature_concepts, one row per (feature, concept) where the feature fired
    factors: pa.Table  # v_feature_factors, one row per (feature, factor, step) (styled digits; else empty)
    top: pa.Table  # v_top_images, one row per (feature, scope, rank), heatmaps included
    neighbors: pa.Table  # v_feature_neighbors, one row per (feature, rank)


class WarehouseReader:
    """Read-only access to the views the dashboard needs; each method is one or two queries."""

    def __init__(self, path: str | Path):
        self.wh = Warehouse(path)

    def runs(self) -> list[RunInfo]:
        runs = self.wh.query("SELECT * FROM runs ORDER BY created_at, run_id").to_pylist()
        classes = self.wh.query("SELECT * FROM v_classes ORDER BY run_id, class_id").to_pylist()
        out = []
        for r in runs:
            mine = tuple(ClassInfo(int(c["class_id"]), c["class_name"], int(c["n_samples"]))
                         for c in classes if c["run_id"] == r["run_id"])
            cfg = json_object(r["config_json"])
            out.append(RunInfo(
                run_id=r["run_id"], model_source=r["model_source"], code_version=r["code_version"],
                created_at=str(r["created_at"]), config=cfg.get("config", cfg),
                store_url=cfg.get("store_url") if isinstance(cfg.get("store_url"), str) else None,
                n_samples=sum(c.n_samples for c in mine), classes=mine,
                judge_classes=tuple(map(str, cfg["judge_classes"])) if isinstance(cfg.get("judge_classes"), list)
                else None,
            ))
        return out

    def saes(self) -> list[SaeInfo]:
        rows = self.wh.query(
            "SELECT s.*, coalesce(f.n, 0) AS n_features FROM saes s "
            "LEFT JOIN (SELECT sae_id, count(*) AS n FROM v_features GROUP BY sae_id) f USING (sae_id) "
            "ORDER BY s.run_id, s.layer, s.site, s.variant, s.sae_id"
        ).to_pylist()
        return [SaeInfo(**r) for r in rows]

    def metrics(self) -> dict[str, dict[str, MetricSeries]]:
        """sae_id -> split -> series; splits without rows are absent."""
        cols = ", ".join(METRICS)
        rows = self.wh.query(f"SELECT sae_id, split, step, {cols} FROM v_sae_metrics ORDER BY sae_id, split, step")
        out: dict[str, dict[str, MetricSeries]] = {}
        grouped: dict[tuple[str, str], list[dict]] = {}
        for r in rows.to_pylist():
            grouped.setdefault((r["sae_id"], r["split"]), []).append(r)
        for (sae_id, split), rs in grouped.items():
            per_step = [r for r in rs if r["step"] != OVERALL_STEP]
            overall = next((r for r in rs if r["step"] == OVERALL_STEP), {})
            out.setdefault(sae_id, {})[split] = MetricSeries(
                split=split,
                steps=[int(r["step"]) for r in per_step],
                values={m: [r[m] for r in per_step] for m in METRICS},
                overall={m: overall.get(m) for m in METRICS},
            )
        return out

    def splice(self) -> dict[str, dict[str, dict[str, Any]]]:
        """sae_id -> split -> the sae_splice row (spliced-sampling quality)."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for r in self.wh.query("SELECT * FROM sae_splice ORDER BY sae_id, split").to_pylist():
            out.setdefault(r.pop("sae_id"), {})[r.pop("split")] = r
        return out

    def samples(self, run_id: str) -> pa.Table:
        """Every sample of the run, ordered by id: the sample pages, the images and the overview's grid."""
        return self.wh.query("SELECT * EXCLUDE (run_id) FROM samples WHERE run_id = ? ORDER BY sample_id",
                             [run_id])

    def feature_list(self, sae_id: str) -> pa.Table:
        """One row per feature (no histograms), with the sample of its strongest top image."""
        return self.wh.query(
            f"SELECT f.* EXCLUDE ({', '.join(SAE_CONTEXT)}, histogram, histogram_edges), "
            "t.sample_id AS top_sample "
            "FROM v_features f LEFT JOIN (SELECT feature_id, sample_id FROM v_top_images "
            "WHERE sae_id = $sae AND scope = 'overall' AND rank = 1) t USING (feature_id) "
            "WHERE f.sae_id = $sae ORDER BY f.feature_id", {"sae": sae_id})

    def feature_block(self, sae_id: str, lo: int, hi: int) -> FeatureBlock:
        with self.wh.reading() as reads:  # six reads, one connection
            def read(view: str, order: str) -> pa.Table:
                return reads.query(
                    f"SELECT * {_EXCLUDE_CONTEXT} FROM {view} WHERE sae_id = ? AND feature_id >= ? "
                    f"AND feature_id < ? ORDER BY {order}", [sae_id, lo, hi])

            return FeatureBlock(
                sae_id=sae_id, lo=lo, hi=hi,
                features=read("v_features", "feature_id"),
                steps=read("v_feature_stats", "feature_id, step"),
                concepts=read("v_feature_concepts", "feature_id, fire_rate DESC, concept"),
                factors=read("v_feature_factors", "feature_id, factor, step"),
                top=read("v_top_images", "feature_id, scope, rank"),
                neighbors=read("v_feature_neighbors", "feature_id, rank"),
            )

    def feature_id_range(self, sae_id: str) -> tuple[int, int]:
        """[lo, hi) covering every feature id of the SAE in any feature view; (0, 0) when there are none."""
        row = self.wh.query(
            "SELECT min(feature_id) AS lo, max(feature_id) AS hi FROM ("
            "SELECT feature_id FROM v_features WHERE sae_id = $s UNION ALL "
            "SELECT feature_id FROM v_top_images WHERE sae_id = $s)", {"s": sae_id}).to_pylist()[0]
        if row["lo"] is None:
            return 0, 0
        return int(row["lo"]), int(row["hi"]) + 1

    def appearances(self, sae_id: str) -> pa.Table:
        """Where each sample is a top image of this SAE (no heatmaps): for the sample pages."""
        return self.wh.query(
            "SELECT sample_id, feature_id, scope, rank, step, activation FROM v_top_images WHERE sae_id = ? "
            "ORDER BY sample_id, rank, activation DESC", [sae_id])

    def factor_probes(self) -> dict[str, pa.Table]:
        """sae_id -> its factor probes (factor, step, k, accuracy, chance), for the overview's hierarchy."""
        rows = self.wh.query("SELECT sae_id, factor, step, k, accuracy, chance FROM factor_probes "
                             "ORDER BY sae_id, factor, k, step")
        ids = rows.column("sae_id").to_pylist()
        return {sid: rows.filter(pc.equal(rows.column("sae_id"), sid)).drop(["sae_id"])
                for sid in dict.fromkeys(ids)}

    def edits(self) -> list[dict[str, Any]]:
        return self.wh.query("SELECT * FROM v_edits ORDER BY edit_id, sample_id").to_pylist()


def json_object(text: Any) -> dict[str, Any]:
    """A JSON column's object ({} for NULL, malformed JSON or a non-object: warehouse text is not trusted)."""
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text) if text else {}
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
