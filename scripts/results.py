"""Regenerate every number and figure the docs show, from the warehouse of a run (and the schema).

    .venv/bin/python scripts/results.py [--config tide.toml]      # after `make run`
    .venv/bin/python scripts/results.py --schema-only [--check]   # the grains table alone (no warehouse)
    .venv/bin/python scripts/results.py --styled configs/styled-digits.toml  # also the factor findings
        [--styled-open configs/styled-digits-open.toml]                      # and the open prompts' probes

The docs mark each generated block with a pair of HTML comments, ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->``; this script replaces what lies between them and touches nothing else. Blocks:
the README's SQL outputs and run time, docs/FINDINGS.md's tables and figures (docs/img/findings_*.png), and
docs/ARCHITECTURE.md's table of grains (from storage/schema.py). ``--check`` rewrites nothing and exits 1
when a block would change (the tests check the grains this way).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from pipelines.context import RunContext  # noqa: E402
from pipelines.plots import pyplot  # noqa: E402
from pipelines.project import Project  # noqa: E402
from pipelines.runner import SESSION_TAG  # noqa: E402
from pipelines.table_format import format_table  # noqa: E402
from scripts.factor_findings import FactorResults, styled_blocks  # noqa: E402
from storage import TABLES, VIEWS, Warehouse  # noqa: E402

README, FINDINGS, ARCHITECTURE = REPO / "README.md", REPO / "docs" / "FINDINGS.md", REPO / "docs" / "ARCHITECTURE.md"
IMG = REPO / "docs" / "img"
PHASES = "CASE WHEN step < 10 THEN '0-9' WHEN step < 40 THEN '10-39' ELSE '40-49' END"


@dataclass(frozen=True)
class Block:
    """One generated block: the file it lives in and the markdown that fills it."""

    path: Path
    name: str
    render: Callable[[], str]


# ------------------------------------------------------------------------------------------ the schema


def grains() -> str:
    rows = ["| table | grain | one row is |", "|---|---|---|"]
    rows += [f"| `{t.name}` | {', '.join(t.grain)} | {t.grain_doc} |" for t in TABLES.values()]
    rows += ["", "| view | what it adds |", "|---|---|"]
    rows += [f"| `{v.name}` | {v.comment} |" for v in VIEWS.values()]
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ a run's results


class Results:
    """The queries behind the README and the findings, on one warehouse."""

    def __init__(self, project: Project):
        self.project = project
        self.wh = Warehouse(project.duckdb_path)

    def sql(self, query: str, params=None) -> str:
        """A `tide sql` call and its output, as the README shows them."""
        shown = " ".join(query.split())
        for p in params or []:
            shown = shown.replace("?", repr(p) if isinstance(p, str) else str(p), 1)
        out = format_table(self.wh.query(query, params), max_rows=None).rstrip()
        return f'```\n$ tide sql "{shown}"\n{out}\n```'

    def table(self, query: str, params=None) -> str:
        """A query's result as a markdown table."""
        t = self.wh.query(query, params)
        rows = ["| " + " | ".join(t.column_names) + " |", "|" + "---|" * t.num_columns]
        for r in t.to_pylist():
            rows.append("| " + " | ".join(_cell(v) for v in r.values()) + " |")
        return "\n".join(rows)

    # --- README --------------------------------------------------------------------------------------

    def run_time(self) -> str:
        """How long the last `tide run` of this warehouse took, from its Dagster instance."""
        import dagster as dg

        instance = dg.DagsterInstance.from_config(str(self.project.dagster_home))
        runs = [r for r in instance.get_run_records() if r.dagster_run.tags.get(SESSION_TAG)]
        if not runs:
            return "(no `tide run` recorded in this warehouse's instance)"
        last = max(runs, key=lambda r: r.create_timestamp).dagster_run.tags[SESSION_TAG]
        mine = [r for r in runs if r.dagster_run.tags[SESSION_TAG] == last]
        start = min(r.start_time for r in mine if r.start_time)
        end = max(r.end_time for r in mine if r.end_time)
        assets = {k for r in mine for k in r.dagster_run.asset_selection or ()}
        return (f"The last `tide run` of this warehouse materialized {len(assets)} assets in {len(mine)} runs "
                f"(one per asset partition) in {end - start:.0f} s.")

    def sae_heldout(self) -> str:
        return self.sql("SELECT layer, variant, round(nmse, 4) AS nmse, round(cosine, 4) AS cosine, "
                        "round(dead_fraction, 4) AS dead FROM v_sae_metrics WHERE split = 'heldout' AND step = -1 "
                        "ORDER BY layer, variant")

    def selective_late(self) -> str:
        return self.sql("SELECT feature_id, round(avg(class_selectivity), 3) AS selectivity, round(avg(fire_rate), 4) "
                        "AS fire_rate FROM v_feature_stats WHERE layer = 5 AND variant = 'tide' AND step >= 40 AND "
                        "top_class = 7 AND fire_rate > 0.001 GROUP BY feature_id HAVING count(*) = 10 "
                        "ORDER BY selectivity DESC LIMIT 5")

    def live_by_step(self) -> str:
        return self.sql("SELECT step, count(*) FILTER (WHERE variant = 'tide' AND fire_rate > 0) AS tide_live, "
                        "count(*) FILTER (WHERE variant = 'topk' AND fire_rate > 0) AS topk_live FROM v_feature_stats "
                        "WHERE layer = 5 AND step IN (0, 10, 20, 30, 40, 45, 49) GROUP BY step ORDER BY step")

    def digit_features(self) -> str:
        return self.sql("SELECT top_class_name AS digit, arg_max(feature_id, class_selectivity) AS feature, "
                        "round(max(class_selectivity), 2) AS selectivity, arg_max(peak_step, class_selectivity) AS "
                        "peak_step, count(*) FILTER (WHERE class_selectivity > 0.5) AS n_selective FROM v_features "
                        "WHERE layer = 5 AND variant = 'tide' AND fire_rate > 0.002 GROUP BY 1 ORDER BY 1")

    def featured(self) -> int:
        """The feature the README follows: layer 5 TIDE's most selective common feature for digit 0."""
        return self.wh.query("SELECT feature_id FROM v_features WHERE layer = 5 AND variant = 'tide' AND top_class = 0 "
                             "AND fire_rate > 0.002 ORDER BY class_selectivity DESC LIMIT 1").column(0)[0].as_py()

    def top_images(self) -> str:
        return self.sql("SELECT rank, sample_id, class_name, step, round(activation, 3) AS activation, judge_pred "
                        "FROM v_top_images WHERE layer = 5 AND variant = 'tide' AND feature_id = ? AND scope = 'overall' "
                        "ORDER BY rank LIMIT 5", [self.featured()])

    def neighbors(self) -> str:
        return self.sql("SELECT n.rank, n.neighbor_id, round(n.cosine, 3) AS cosine, f.peak_step, f.top_class_name, "
                        "round(f.class_selectivity, 2) AS selectivity FROM v_feature_neighbors n JOIN v_features f "
                        "ON f.sae_id = n.sae_id AND f.feature_id = n.neighbor_id WHERE n.layer = 5 AND n.variant = "
                        "'tide' AND n.feature_id = ? ORDER BY n.rank LIMIT 5", [self.featured()])

    # --- findings ------------------------------------------------------------------------------------

    def model_quality(self) -> str:
        q = json.loads((self.project.root / "sample_quality.json").read_text())
        return (f"| images | judge accuracy | Frechet distance to real digits | real-vs-real floor |\n|---|---|---|---|\n"
                f"| {q['n']} | {q['accuracy']:.3f} | {q['frechet_distance']:.1f} | "
                f"{q['frechet_distance_real_split']:.1f} |")

    def sae_table(self) -> str:
        return self.table("SELECT s.layer, s.variant, round(m.nmse, 4) AS heldout_nmse, round(m.cosine, 4) AS cosine, "
                          "round(m.dead_fraction, 4) AS dead, round(p.loss_recovered, 3) AS loss_recovered, "
                          "round(p.accuracy_spliced, 3) AS judge_acc_spliced, round(p.accuracy_unspliced, 3) AS "
                          "judge_acc_unspliced FROM saes s JOIN sae_metrics m ON m.sae_id = s.sae_id AND m.split = "
                          "'heldout' AND m.step = -1 LEFT JOIN sae_splice p ON p.sae_id = s.sae_id ORDER BY 1, 2")

    def tide_vs_topk(self) -> str:
        return self.table("SELECT a.layer, count(*) AS steps, count(*) FILTER (WHERE a.nmse < b.nmse) AS tide_better, "
                          "round(avg(a.nmse / b.nmse), 3) AS mean_nmse_ratio FROM v_sae_metrics a JOIN v_sae_metrics b "
                          "ON a.layer = b.layer AND a.site = b.site AND a.split = b.split AND a.step = b.step "
                          "WHERE a.variant = 'tide' AND b.variant = 'topk' AND a.split = 'heldout' AND a.step >= 0 "
                          "GROUP BY 1 ORDER BY 1")

    def _sweeps(self) -> str:
        """A SQL CASE naming each sweep of this warehouse by the config that ran it (configs/sweep-*.toml)."""
        from pipelines.stages.sae_sweep import sweep_id

        runs = self.wh.query("SELECT DISTINCT run_id FROM sae_sweep").column(0).to_pylist()
        names = {sweep_id(Project.load(path).config, run): path.stem for path in sorted((REPO / "configs").glob(
            "sweep-*.toml")) for run in runs}
        cases = " ".join(f"WHEN '{sid}' THEN '{name}'" for sid, name in names.items())
        return f"CASE sweep_id {cases} ELSE sweep_id END" if cases else "sweep_id"

    def sweep(self) -> str:
        lrs = self.wh.query("SELECT DISTINCT lr FROM sae_sweep ORDER BY lr").column(0).to_pylist()
        cols = ", ".join(f"any_value(cell) FILTER (WHERE lr = {lr!r}) AS \"{lr:g}\"" for lr in lrs)
        return self.table(f"SELECT sweep, layer, variant, {cols} FROM (SELECT {self._sweeps()} AS sweep, layer, "
                          "variant, lr, printf('%.4f (%d%%)', nmse, round(100 * dead_fraction)::INT) AS cell FROM "
                          "sae_sweep WHERE step = -1) GROUP BY ALL ORDER BY sweep, layer, variant")

    def sweep_best(self) -> str:
        return self.table(f"WITH best AS (SELECT *, {self._sweeps()} AS sweep FROM v_sae_sweep_best), steps AS ("
                          "SELECT t.sweep_id, t.layer, count(*) FILTER (WHERE t.nmse < k.nmse) AS tide_better, count(*) AS n FROM "
                          "sae_sweep t JOIN best bt ON bt.sweep_id = t.sweep_id AND bt.point = t.point AND bt.variant "
                          "= t.variant JOIN sae_sweep k ON k.sweep_id = t.sweep_id AND k.layer = t.layer AND k.step = "
                          "t.step JOIN best bk ON bk.sweep_id = k.sweep_id AND bk.point = k.point AND bk.variant = "
                          "k.variant WHERE t.variant = 'tide' AND k.variant = 'topk' AND t.step >= 0 GROUP BY 1, 2) "
                          "SELECT b.sweep, b.layer, b.variant, b.lr AS best_lr, round(b.nmse, 4) AS nmse, "
                          "round(b.dead_fraction, 3) AS dead, round(b.nmse / k.nmse, 3) AS over_topk, "
                          "s.tide_better || ' of ' || s.n AS steps_tide_better FROM best b JOIN (SELECT sweep, layer, "
                          "nmse FROM best WHERE variant = 'topk') k ON k.layer = b.layer AND k.sweep = CASE WHEN "
                          "b.sweep IN (SELECT sweep FROM best WHERE variant = 'topk') THEN b.sweep ELSE "
                          "'sweep-digits' END LEFT JOIN steps s ON s.sweep_id = b.sweep_id AND s.layer = b.layer "
                          "AND b.variant = 'tide' ORDER BY b.layer, b.sweep DESC, "
                          "b.variant DESC")

    def variants(self) -> str:
        """Every variant of configs/sweep-variants.toml at each learning rate: held-out NMSE, L0 (the batch
        variants' inference L0 is set by their threshold, not by k) and dead share."""
        rows = self.wh.query(f"SELECT * FROM (SELECT {self._sweeps()} AS sweep, * FROM sae_sweep) WHERE sweep = "
                             "'sweep-variants' AND step = -1").to_pylist()
        if not rows:
            return "(no `sweep-variants` points in this warehouse)"
        lrs = sorted({r["lr"] for r in rows})
        out = ["| layer | variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|---|" + "---|" * len(lrs)]
        for layer, variant in sorted({(r["layer"], r["variant"]) for r in rows}):
            cell = {r["lr"]: f"{r['nmse']:.4f} / {r['l0']:.1f} / {100 * r['dead_fraction']:.0f}%" for r in rows
                    if r["layer"] == layer and r["variant"] == variant}
            out.append(f"| {layer} | {variant} | " + " | ".join(cell.get(lr, "") for lr in lrs) + " |")
        return "\n".join(out)

    def by_phase(self) -> str:
        return self.table(f"SELECT layer, variant, {PHASES} AS steps, round(sum(class_selectivity * fire_rate) / "
                          "sum(fire_rate), 3) AS weighted_selectivity, round(avg(count_live), 0) AS live_per_step FROM "
                          "(SELECT *, count(*) FILTER (WHERE fire_rate > 0) OVER (PARTITION BY sae_id, step) AS "
                          "count_live FROM v_feature_stats) GROUP BY ALL ORDER BY variant, layer, steps")

    def peak_steps(self) -> str:
        return self.table(f"SELECT layer, variant, {PHASES.replace('step', 'peak_step')} AS peak_steps, count(*) AS "
                          "features FROM v_features WHERE fire_rate > 0 GROUP BY ALL ORDER BY variant, layer, peak_steps")

    def heatmap_spread(self) -> str:
        return self.table(f"SELECT layer, variant, {PHASES} AS steps, round(avg(len(list_filter(heatmap, lambda v: "
                          "v > 0)) / len(heatmap)), 3) AS patches_active, count(*) AS images FROM v_top_images WHERE "
                          "scope = 'peak_step' AND rank <= 4 GROUP BY ALL ORDER BY variant, layer, steps")

    def edits(self) -> str:
        return self.table("SELECT layer, variant, op, strength, step_start || '-' || step_end AS steps, count(*) AS "
                          "images, round(avg(flipped::INT), 3) AS judge_changed, round(avg((pred_after = target_class)"
                          "::INT), 3) AS became_target FROM v_edits GROUP BY ALL ORDER BY ALL")

    def figures(self) -> str:
        rows = self.wh.query("SELECT layer, variant, step, sum(class_selectivity * fire_rate) / sum(fire_rate) AS "
                             "weighted_selectivity, count(*) FILTER (WHERE fire_rate > 0) AS live FROM v_feature_stats "
                             "GROUP BY ALL ORDER BY layer, variant, step").to_pylist()
        IMG.mkdir(parents=True, exist_ok=True)
        _per_step(rows, "live", "features firing at the step", IMG / "findings_live_by_step.png")
        _per_step(rows, "weighted_selectivity", "class selectivity\n(fire-rate weighted)",
                  IMG / "findings_selectivity_by_step.png")
        return ("![features firing at each step](img/findings_live_by_step.png)\n\n"
                "![class selectivity by step](img/findings_selectivity_by_step.png)")


    def gallery(self) -> str:
        """Per variant of layer 5: four features (the most class-selective common one, and the most frequent
        ones peaking early, midway and in the last steps) with their top images, heatmaps and fire rate by
        step."""
        store = RunContext(self.project).store()
        lines = []
        for variant in ("tide", "topk"):
            sae_id = self.wh.query("SELECT sae_id FROM saes WHERE layer = 5 AND variant = ?", [variant]
                                   ).column(0)[0].as_py()
            picks = _pick_features(self.wh, sae_id)
            _gallery(self.wh, store, sae_id, picks, IMG / f"findings_gallery_{variant}.png")
            lines.append(f"![{variant} features](img/findings_gallery_{variant}.png)\n")
            lines += [f"- {variant} #{f['feature_id']}: peak step {f['peak_step']}, top class {f['top_class_name']}, "
                      f"selectivity {f['class_selectivity']:.2f}, fire rate {f['fire_rate']:.4f}" for f in picks]
            lines.append("")
        return "\n".join(lines).rstrip()


def _pick_features(wh: Warehouse, sae_id: str) -> list[dict]:
    base = "SELECT * FROM v_features WHERE sae_id = ? AND fire_rate > 0.002 "
    picks = wh.query(base + "ORDER BY class_selectivity DESC LIMIT 1", [sae_id]).to_pylist()
    for lo, hi in ((0, 5), (20, 30), (45, 50)):
        picks += wh.query(base + "AND peak_step >= ? AND peak_step < ? AND feature_id <> ? ORDER BY fire_rate DESC "
                          "LIMIT 1", [sae_id, lo, hi, picks[0]["feature_id"]]).to_pylist()
    return picks


def _gallery(wh: Warehouse, store, sae_id: str, features: list[dict], path: Path, n: int = 8) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(features), n + 1, figsize=(1.3 * n + 3.2, 1.45 * len(features)),
                             gridspec_kw={"width_ratios": [1] * n + [2.6]}, squeeze=False)
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
        curve = wh.query("SELECT step, fire_rate FROM v_feature_stats WHERE sae_id = ? AND feature_id = ? ORDER BY step",
                         [sae_id, f["feature_id"]]).to_pylist()
        row[n].plot([c["step"] for c in curve], [c["fire_rate"] for c in curve])
        row[n].set_title(f"#{f['feature_id']}: top class {f['top_class_name']}, sel {f['class_selectivity']:.2f}",
                         fontsize=7)
        row[n].tick_params(labelsize=6)
        row[n].set_xlabel("step", fontsize=6)
        row[n].set_ylabel("fire rate", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _cell(v) -> str:
    return "" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def _per_step(rows: list[dict], key: str, ylabel: str, path: Path) -> None:
    plt = pyplot()
    variants = sorted({r["variant"] for r in rows})
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 3.4), sharey=True, squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        for layer in sorted({r["layer"] for r in rows}):
            pts = [(r["step"], r[key]) for r in rows if r["layer"] == layer and r["variant"] == variant]
            ax.plot(*zip(*pts, strict=True), label=f"layer {layer}")
        ax.set_title(variant)
        ax.set_xlabel("step (0 = noisiest)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------ rewriting


def blocks(results: Results | None, styled: FactorResults | None = None,
           styled_open: FactorResults | None = None) -> list[Block]:
    out = [Block(ARCHITECTURE, "grains", grains), *styled_blocks(styled, Block), *styled_blocks(styled_open, Block)]
    if results is None:
        return out
    r = results
    out += [Block(README, name, fn) for name, fn in (
        ("run-time", r.run_time), ("sae-heldout", r.sae_heldout), ("selective-late", r.selective_late),
        ("live-by-step", r.live_by_step), ("digit-features", r.digit_features), ("top-images", r.top_images),
        ("neighbors", r.neighbors))]
    out += [Block(FINDINGS, name, fn) for name, fn in (
        ("model-quality", r.model_quality), ("sae-table", r.sae_table), ("tide-vs-topk", r.tide_vs_topk),
        ("sweep", r.sweep), ("sweep-best", r.sweep_best), ("variants", r.variants),
        ("figures", r.figures), ("by-phase", r.by_phase), ("peak-steps", r.peak_steps),
        ("heatmap-spread", r.heatmap_spread), ("gallery", r.gallery), ("edits", r.edits))]
    return out


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the block ``name`` filled with ``body``; ValueError when the markers are missing."""
    pattern = re.compile(rf"(<!-- generated:{re.escape(name)} -->\n).*?(\n<!-- /generated:{re.escape(name)} -->)",
                         re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"no <!-- generated:{name} --> ... <!-- /generated:{name} --> markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def regenerate(items: list[Block], check: bool) -> list[str]:
    """Fill every block; returns the names of those that changed (and writes them unless ``check``)."""
    changed = []
    for path in sorted({b.path for b in items}):
        text = path.read_text()
        new = text
        for b in (b for b in items if b.path == path):
            try:
                new = replace_block(new, b.name, b.render())
            except ValueError as err:
                raise SystemExit(f"{path.relative_to(REPO)}: {err}") from None
        if new != text:
            changed += [f"{path.relative_to(REPO)}:{b.name}" for b in items if b.path == path
                        and replace_block(text, b.name, b.render()) != text]
            if not check:
                path.write_text(new)
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="the run whose warehouse to read (default tide.toml)")
    p.add_argument("--schema-only", action="store_true", help="only the blocks that need no warehouse")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is out of date")
    p.add_argument("--styled", default=None, help="a styled-digits run's config: also its factor findings "
                   "(probes from its warehouse, edits from bench/factor_edits.py's results)")
    p.add_argument("--styled-open", default=None, help="the styled run whose prompts name only the digit "
                   "(configs/styled-digits-open.toml): also its factor probes")
    p.add_argument("--styled-only", action="store_true", help="with --styled: only the factor findings")
    args = p.parse_args(argv)
    results = None if args.schema_only or args.styled_only else Results(Project.load(args.config or REPO / "tide.toml"))
    styled = FactorResults(Project.load(args.styled)) if args.styled else None
    styled_open = FactorResults(Project.load(args.styled_open), tag="open") if args.styled_open else None
    changed = regenerate(blocks(results, styled, styled_open), args.check)
    for name in changed:
        print(("out of date: " if args.check else "updated: ") + name)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
