"""Figures and tables for docs/FINDINGS.md, computed from the default run's warehouse and store.

    .venv/bin/python scripts/findings.py [--config tide.toml] [--out docs/img]

Reads only the warehouse views and the stored images (run `make run` first). Prints the markdown tables
that docs/FINDINGS.md quotes and writes the figures it shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipelines.capture_ops import open_store  # noqa: E402
from pipelines.project import Project  # noqa: E402
from storage.warehouse import Warehouse, format_table  # noqa: E402

PER_STEP = """
SELECT layer, variant, step,
       sum(class_selectivity * fire_rate) / sum(fire_rate) AS weighted_selectivity,
       avg((class_selectivity > 0.5)::INT) FILTER (WHERE fire_rate > 0) AS share_selective,
       count(*) FILTER (WHERE fire_rate > 0) AS live
FROM v_feature_stats GROUP BY ALL ORDER BY layer, variant, step
"""

BY_PHASE = """
SELECT layer, variant, CASE WHEN step < 10 THEN '0-9' WHEN step < 40 THEN '10-39' ELSE '40-49' END AS steps,
       round(sum(class_selectivity * fire_rate) / sum(fire_rate), 3) AS weighted_selectivity,
       round(avg((class_selectivity > 0.5)::INT) FILTER (WHERE fire_rate > 0), 3) AS share_selective,
       round(avg(count_live), 0) AS live_per_step
FROM (SELECT *, count(*) FILTER (WHERE fire_rate > 0) OVER (PARTITION BY sae_id, step) AS count_live
      FROM v_feature_stats)
GROUP BY ALL ORDER BY variant, layer, steps
"""

SPREAD = """
SELECT layer, variant, CASE WHEN step < 10 THEN '0-9' WHEN step < 40 THEN '10-39' ELSE '40-49' END AS steps,
       round(avg(len(list_filter(heatmap, lambda v: v > 0)) / len(heatmap)), 3) AS patches_active,
       count(*) AS images
FROM v_top_images WHERE scope = 'peak_step' AND rank <= 4 GROUP BY ALL ORDER BY variant, layer, steps
"""

PEAKS = """
SELECT layer, variant, CASE WHEN peak_step < 10 THEN '0-9' WHEN peak_step < 40 THEN '10-39' ELSE '40-49' END
       AS peak_steps, count(*) AS features
FROM v_features WHERE fire_rate > 0 GROUP BY ALL ORDER BY variant, layer, peak_steps
"""


def per_step_plot(rows: list[dict], key: str, ylabel: str, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, variant in zip(axes, ("tide", "topk"), strict=True):
        for layer in sorted({r["layer"] for r in rows}):
            pts = [(r["step"], r[key]) for r in rows if r["layer"] == layer and r["variant"] == variant]
            ax.plot(*zip(*pts, strict=True), label=f"layer {layer}")
        ax.set_title(variant)
        ax.set_xlabel("step (0 = noisiest)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].legend()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def pick_features(wh: Warehouse, sae_id: str) -> list[dict]:
    """Four features to show: the most class-selective common one, and the most frequent features that
    peak at an early, a middle and the last ten steps."""
    base = "SELECT * FROM v_features WHERE sae_id = ? AND fire_rate > 0.002 "
    picks = wh.query(base + "ORDER BY class_selectivity DESC LIMIT 1", [sae_id]).to_pylist()
    for lo, hi in ((0, 5), (20, 30), (45, 50)):
        picks += wh.query(base + "AND peak_step >= ? AND peak_step < ? AND feature_id <> ? "
                          "ORDER BY fire_rate DESC LIMIT 1", [sae_id, lo, hi, picks[0]["feature_id"]]).to_pylist()
    return picks


def gallery(wh: Warehouse, store, sae_id: str, features: list[dict], path: Path, n: int = 8) -> None:
    """Per feature: its top images (overall) with the heatmap at the image's best step, and its fire
    rate against step."""
    fig, axes = plt.subplots(len(features), n + 1, figsize=(1.3 * n + 3.2, 1.45 * len(features)),
                             gridspec_kw={"width_ratios": [1] * n + [2.6]})
    for row, f in zip(axes, features, strict=True):
        top = wh.top_images(sae_id, f["feature_id"], limit=n).to_pylist()
        for ax, t in zip(row[:n], top, strict=False):
            img = store.images(t["sample_id"], t["sample_id"] + 1)[0, :, :, 0]  # [H, W]
            heat = np.asarray(t["heatmap"], np.float32).reshape(t["grid_h"], t["grid_w"])
            heat = np.kron(heat, np.ones((img.shape[0] // t["grid_h"], img.shape[1] // t["grid_w"])))
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            ax.imshow(np.ma.masked_equal(heat, 0), cmap="autumn", alpha=0.55, vmin=0, vmax=heat.max() or 1)
            ax.set_title(f"{t['class_name']} @{t['step']}", fontsize=7)
        for ax in row[:n]:
            ax.axis("off")
        curve = wh.query("SELECT step, fire_rate FROM v_feature_stats WHERE sae_id = ? AND feature_id = ? "
                         "ORDER BY step", [sae_id, f["feature_id"]]).to_pylist()
        row[n].plot([c["step"] for c in curve], [c["fire_rate"] for c in curve])
        row[n].set_title(f"#{f['feature_id']}: top class {f['top_class_name']}, sel {f['class_selectivity']:.2f}",
                         fontsize=7)
        row[n].tick_params(labelsize=6)
        row[n].set_xlabel("step", fontsize=6)
        row[n].set_ylabel("fire rate", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--out", default="docs/img")
    p.add_argument("--layer", type=int, default=5)
    args = p.parse_args()
    project = Project.load(args.config)
    wh = Warehouse(project.duckdb_path)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = wh.query(PER_STEP).to_pylist()
    per_step_plot(rows, "weighted_selectivity", "class selectivity\n(fire-rate weighted)",
                  out / "findings_selectivity_by_step.png")
    per_step_plot(rows, "live", "features firing at the step", out / "findings_live_by_step.png")
    for title, sql in (("by phase", BY_PHASE), ("heatmap spread", SPREAD), ("peak steps", PEAKS)):
        print(f"\n### {title}\n")
        print(format_table(wh.query(sql), max_rows=None))
    store = open_store(project)
    for variant in ("tide", "topk"):
        sae_id = wh.query("SELECT sae_id FROM saes WHERE layer = ? AND variant = ?", [args.layer, variant]
                          ).column(0)[0].as_py()
        feats = pick_features(wh, sae_id)
        gallery(wh, store, sae_id, feats, out / f"findings_gallery_{variant}.png")
        print(f"\n{variant} gallery ({sae_id}): " + ", ".join(
            f"#{f['feature_id']} (peak {f['peak_step']}, top {f['top_class_name']}, sel {f['class_selectivity']:.2f}, "
            f"fire {f['fire_rate']:.4f})" for f in feats))


if __name__ == "__main__":
    main()
