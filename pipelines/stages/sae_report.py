"""Cross-layer summary of the SAE variants, read from the warehouse (for the `sae_metrics` asset)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.context import RunContext
from pipelines.plots import png_bytes_of_figure, pyplot


@dataclass(frozen=True)
class SAESummary:
    rows: list[dict]  # one per SAE: layer, variant, held-out overall metrics, splice results
    table_md: str
    plots: dict[str, bytes]  # name -> PNG


SUMMARY_SQL = """
SELECT s.sae_id, s.layer, s.site, s.variant, m.nmse, m.cosine, m.explained_variance, m.l0, m.dead_fraction,
       p.loss_recovered, p.pixel_mse, p.accuracy_spliced, p.accuracy_unspliced
FROM saes s
JOIN sae_metrics m ON m.sae_id = s.sae_id AND m.split = 'heldout' AND m.step = -1
LEFT JOIN sae_splice p ON p.sae_id = s.sae_id
ORDER BY s.layer, s.site, s.variant
"""

PER_STEP_SQL = """
SELECT s.layer, s.site || ' ' || s.variant AS variant, m.step, m.nmse, m.l0
FROM saes s JOIN sae_metrics m ON m.sae_id = s.sae_id AND m.split = 'heldout' AND m.step >= 0
ORDER BY s.layer, variant, m.step
"""


def summarise(ctx: RunContext) -> SAESummary:
    with ctx.warehouse.reading() as wh:
        rows = wh.query(SUMMARY_SQL).to_pylist()
        per_step = wh.query(PER_STEP_SQL).to_pylist()
    cols = ["layer", "site", "variant", "nmse", "cosine", "explained_variance", "l0", "dead_fraction",
            "loss_recovered", "pixel_mse", "accuracy_spliced", "accuracy_unspliced"]
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    layers = sorted({r["layer"] for r in per_step})
    plt = pyplot()
    plots = {}
    for key, label in (("nmse", "held-out normalised MSE"), ("l0", "held-out L0")):
        if not layers:
            break
        fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3), sharey=True, squeeze=False)
        for ax, layer in zip(axes[0], layers, strict=True):
            for variant in sorted({r["variant"] for r in per_step if r["layer"] == layer}):
                pts = [r for r in per_step if r["layer"] == layer and r["variant"] == variant]
                ax.plot([p["step"] for p in pts], [p[key] for p in pts], label=variant)
            ax.set_title(f"layer {layer}")
            ax.set_xlabel("step (0 = noisiest)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(label)
        axes[0][0].legend()
        plots[f"{key}_by_step"] = png_bytes_of_figure(fig)
    return SAESummary(rows=rows, table_md="\n".join(table), plots=plots)
