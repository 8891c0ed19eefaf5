"""The styled-digits blocks of docs/FINDINGS.md: the factor hierarchy (sparse probes by step and layer) and
the factor edits with their baselines, from a styled run's warehouse and `bench/factor_edits.py`'s report;
and the same hierarchy blocks (tagged "open") for the run whose prompts name only the digit.

    .venv/bin/python scripts/results.py --styled configs/styled-digits.toml \
        --styled-open configs/styled-digits-open.toml

(``scripts/results.py`` renders these blocks beside the default run's when given ``--styled``.)
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.plots import pyplot
from pipelines.project import Project
from storage import Warehouse

REPO = Path(__file__).resolve().parent.parent
FINDINGS, IMG = REPO / "docs" / "FINDINGS.md", REPO / "docs" / "img"
EDITS = REPO / "bench" / "out" / "factor_edits" / "report.json"  # the cells the bench's last run reported
DECIDED = 0.9  # a factor is decided at the first step whose raw probe closes this share of chance -> final


class FactorResults:
    """The queries behind the styled-digits findings, on one styled run's warehouse."""

    def __init__(self, project: Project, tag: str = ""):
        """tag: "" for the shipped prompts' run, else a suffix of the block names and the figure's file."""
        self.project, self.tag = project, tag
        if not project.duckdb_path.exists():
            raise SystemExit(f"no warehouse at {project.duckdb_path}: run `tide run --config {project.config_path}` "
                             "first (its factor probes are what these blocks show)")
        self.wh = Warehouse(project.duckdb_path)

    def _raw(self) -> list[dict]:
        """The raw-channel probe (k = 0) of each layer, factor and step (the same for every SAE of a layer)."""
        return self.wh.query("SELECT layer, factor, step, any_value(accuracy) AS accuracy, any_value(chance) AS "
                             "chance FROM v_factor_probes WHERE k = 0 GROUP BY ALL ORDER BY ALL").to_pylist()

    def probes(self) -> str:
        """Per factor and layer: chance, and the raw probe's and the SAEs' 4-latent probes' accuracy at the
        first, middle and last probed step."""
        steps = self.wh.query("SELECT list(DISTINCT step ORDER BY step) FROM factor_probes").column(0)[0].as_py()
        picked = [steps[0], steps[len(steps) // 2], steps[-1]]
        rows = self.wh.query("SELECT factor, layer, variant, k, step, accuracy, chance FROM v_factor_probes WHERE "
                             "k IN (0, 4) AND list_contains(?, step) ORDER BY ALL", [picked]).to_pylist()
        cols = ["raw", "tide k=4", "topk k=4"]
        table: dict[tuple, dict] = {}
        for r in rows:
            entry = table.setdefault((r["factor"], r["layer"]), {"chance": r["chance"]})
            entry.setdefault("raw" if r["k"] == 0 else f"{r['variant']} k=4", {})[r["step"]] = r["accuracy"]
        out = [f"Accuracy at steps {' / '.join(map(str, picked))} (5-fold cross-validated; chance: always the "
               "commonest value):", "", "| factor | layer | chance | " + " | ".join(cols) + " |",
               "|---|---|---|" + "---|" * len(cols)]
        for (factor, layer), e in sorted(table.items()):
            cells = [" / ".join(f"{e[c][s]:.2f}" for s in picked) if c in e else "-" for c in cols]
            out.append(f"| {factor} | {layer} | {e['chance']:.2f} | " + " | ".join(cells) + " |")
        return "\n".join(out)

    def decided(self) -> str:
        """Per factor: the first probed step at which some layer's raw probe closes DECIDED of the way from
        chance to that layer's last-step accuracy, and the layer; a factor never above chance is said so."""
        raw = self._raw()
        lines = []
        for factor in sorted({r["factor"] for r in raw}):
            best = None
            for layer in sorted({r["layer"] for r in raw if r["factor"] == factor}):
                curve = [r for r in raw if r["factor"] == factor and r["layer"] == layer]
                final, chance = curve[-1]["accuracy"], curve[-1]["chance"]
                if final - chance < 0.05:
                    continue
                step = next(r["step"] for r in curve if r["accuracy"] - chance >= DECIDED * (final - chance))
                if best is None or (step, -final) < (best[0], -best[2]):
                    best = (step, layer, final, chance)
            if best is None:
                chance = next(r["chance"] for r in raw if r["factor"] == factor)
                lines.append(f"- **{factor}**: no layer's probe rises 0.05 above chance ({chance:.2f}) "
                             "by the last step: the images do not show it reliably.")
            else:
                step, layer, final, chance = best
                lines.append(f"- **{factor}**: decided by step {step} (layer {layer}: {DECIDED:.0%} of the way from "
                             f"chance {chance:.2f} to its final {final:.2f}).")
        return "\n".join(lines)

    def figure(self) -> str:
        raw = self._raw()
        sae = self.wh.query("SELECT layer, factor, step, accuracy FROM v_factor_probes WHERE k = 4 AND variant = "
                            "'tide' ORDER BY ALL").to_pylist()
        factors = sorted({r["factor"] for r in raw})
        plt = pyplot()
        fig, axes = plt.subplots(1, len(factors), figsize=(3.2 * len(factors), 3.0), sharey=True)
        for ax, factor in zip(axes, factors, strict=True):
            for i, layer in enumerate(sorted({r["layer"] for r in raw})):
                curve = [r for r in raw if r["factor"] == factor and r["layer"] == layer]
                ax.plot([r["step"] for r in curve], [r["accuracy"] for r in curve], color=f"C{i}",
                        label=f"layer {layer} raw")
                mine = [r for r in sae if r["factor"] == factor and r["layer"] == layer]
                ax.plot([r["step"] for r in mine], [r["accuracy"] for r in mine], color=f"C{i}", ls="--",
                        label=f"layer {layer} tide k=4")
            chance = next(r["chance"] for r in raw if r["factor"] == factor)
            ax.axhline(chance, color="grey", ls=":", label="chance")
            ax.set(title=factor, xlabel="step (0 = noisiest)", ylim=(0, 1.02))
        axes[0].set_ylabel("held-out probe accuracy")
        axes[-1].legend(fontsize=7)
        fig.tight_layout()
        IMG.mkdir(parents=True, exist_ok=True)
        name = f"findings_factor_probes{'_' + self.tag if self.tag else ''}.png"
        fig.savefig(IMG / name, dpi=110)
        plt.close(fig)
        return f"![factor probes by step and layer](img/{name})"

    def edits(self) -> str:
        """The factor-edit bench's reported cells: every edit by each method at its searched setting, then
        the colour edit with CFG renormalisation on and on the conditional half only."""
        if not EDITS.exists():
            return "(no `bench/factor_edits.py` report on this machine)"
        report = json.loads(EDITS.read_text())
        rows, n = report["rows"] + report["variants"], report["seeds"]
        out = [f"{n} held-out seeds per cell; each score over the images whose targeted factor did not already "
               "show the target (eligible). preserved: share of the other factors unchanged; preserved_style: of "
               "the other style factors; kept_class: the judged class unchanged; both: success with every other "
               "style factor kept.", "",
               "| edit | method | layer | window | strength | CFG renorm | branch | eligible | success | preserved | "
               "preserved_style | kept_class | both | FD before -> after |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def f(v):
            return "-" if v is None else f"{v:.3f}"

        for r in rows:
            out.append(f"| {r['kind']} | {r['method']} | {r['layer'] or '-'} | {r['window'] or '-'} | "
                       f"{r['strength'] if r['strength'] is not None else '-'} | "
                       f"{'off' if r.get('cfg_renorm') is None else r['cfg_renorm']} | {r.get('branch', 'both')} | "
                       f"{r['eligible']} | {f(r['success'])} | "
                       f"{f(r['preserved'])} | {f(r['preserved_style'])} | {f(r['kept_class'])} | {f(r['both'])} | "
                       f"{r['fd_before']:.0f} -> {r['fd_after']:.0f} |")
        return "\n".join(out)


def styled_blocks(results: FactorResults | None, block) -> list:
    """The FINDINGS blocks of a styled run (``block``: scripts/results.py's Block); the edits only for the
    untagged (shipped prompts') run, which the bench edits."""
    if results is None:
        return []
    r, tag = results, f"-{results.tag}" if results.tag else ""
    fns = [("factor-probes", r.probes), ("factor-decided", r.decided), ("factor-probes-figure", r.figure)]
    fns += [] if tag else [("factor-edits", r.edits)]
    return [block(FINDINGS, name + tag, fn) for name, fn in fns]
