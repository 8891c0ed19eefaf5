"""Factor edits on the styled digits, scored by the factor judge, with their baselines in one table.

Edits: one factor a -> b (colour, thickness, background, class), and style transfer (a reference image's
colour, thickness and background onto a target, whose class is kept). Methods, on the same held-out seeds
(the run's sampler seed + 7919, never captured) and prompts:

* tide / topk: the SAE's latents of the factor values (``feature_factors``, pooled over steps: the n most
  informative latents whose best value is the value) at one block and step window: a's latents zeroed, b's
  raised by ``strength`` times their mean activation (style: each latent of any style value moved, pooled
  over the image, to the reference's level: the ``style`` op).
* dim: diff-in-means steering (``tide_core.steer``): the mean block output of the run's images showing b
  minus those showing a, per step, added at ``strength`` (style: summed over the factors that differ).
* prompt: the same seed with the prompt naming b (style: the target's class with the reference's style):
  an upper bound, what asking would have given.

Scores (the judge on before, after and reference images), over the images whose targeted factors did not
already show the target: success = the targeted factor(s) show the target value(s); preserved = the share of
the other factors that show what they showed before (preserved_style: of the other style factors; kept_class:
the class alone, which this model does not draw as asked, so its judged class moves with any change to the
strokes); both = success with every other style factor kept; FD = Frechet distance of the images to real renders in the judge's features (before: the unedited images'). A
search on --search-seeds picks each method's layer, window and strength for the colour edit (most "both");
the other edits use each method's colour choice. Then each method's colour cell again with CFG
renormalisation on (``--cfg-renorm``, before and after images alike) and with the edit on the conditional
CFG half only (the guidance then scales the edit as it scales the prompt). Results append to
bench/out/factor_edits/results.jsonl
(a rerun skips what is there), and the cells reported go to report.json (the findings' table). Usage:
python bench/factor_edits.py --config configs/styled-digits.toml
The last line names the best colour-edit success.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.project import Project  # noqa: E402
from pipelines.stages.edit_plan import feature_units  # noqa: E402
from storage import ActivationStore, Warehouse  # noqa: E402
from tide_core.edit import EditHook, EditSpec, StepWindow  # noqa: E402
from tide_core.prompts import Prompt, PromptSet  # noqa: E402
from tide_core.quality import frechet_distance  # noqa: E402
from tide_core.sae import SparseAutoencoder  # noqa: E402
from tide_core.sampling import Sampler, from_uint8  # noqa: E402
from tide_core.steer import SteerHook, value_means  # noqa: E402
from tide_core.styled_digits import FACTOR_NAMES, FACTORS, caption, factor_grid  # noqa: E402

SEED_OFFSET = 7919  # held-out seeds: the run's sampler seed + this
N_FEATURES = 8
STYLE = (1, 2, 3)  # colour, thickness, background: the factor indices a style transfer copies
SEARCH = {"tide": (0.5, 1.0, 2.0, 8.0, 32.0), "topk": (0.5, 1.0, 2.0, 8.0, 32.0), "dim": (1.0, 2.0, 4.0)}  # strengths
WINDOWS = ("early", "late", "all")


class Observers:
    """One StepObserver that tells several hooks where the sampler is."""

    def __init__(self, hooks):
        self.hooks = hooks

    def begin_step(self, step, timestep, batch, guided):
        for h in self.hooks:
            h.begin_step(step, timestep, batch, guided)

    def end_step(self, step):
        for h in self.hooks:
            h.end_step(step)


class Bench:
    def __init__(self, config: str, out: Path, batch: int, cfg_renorm: float):
        from tide_core.models.registry import load_model
        from tide_core.models.styled import FactorJudgeAdapter

        self.project = Project.load(config)
        cfg = self.project.config
        if cfg.model.source != "styled-digits":
            raise SystemExit(f"{config}: model.source is {cfg.model.source!r}; factor edits need the styled digits "
                             "(--config configs/styled-digits.toml), whose judge knows the factors")
        if not self.project.duckdb_path.exists():
            raise SystemExit(f"no warehouse at {self.project.duckdb_path}: run `tide run --config {config}` first")
        self.out, self.batch = out, batch
        self.wh = Warehouse(self.project.duckdb_path)
        if not self.wh.query("SELECT count(*) FROM feature_factors").column(0)[0].as_py():
            raise SystemExit(f"{self.project.duckdb_path} has no feature_factors rows: materialize feature_stats "
                             f"(`tide run --config {config}`) before editing by factor")
        self.store = ActivationStore.open(self.project.store_url, mode="r")
        self.grid = factor_grid()  # [540, 4]: every caption with every factor named is a condition
        self.prompts = PromptSet(tuple(Prompt(caption(c)) for c in self.grid))
        self.model = load_model(cfg.model, self.prompts, cfg.sampling.negative_prompt)
        s = cfg.sampling
        self.samplers = {renorm: Sampler(self.model, s.scheduler, s.num_steps, s.guidance_scale, s.seed + SEED_OFFSET,
                                         cfg_renorm=renorm) for renorm in (None, cfg_renorm)}
        self.steps = s.num_steps
        self.judge = FactorJudgeAdapter.load(self.project.judge_dir)
        self.real = self.judge.judge(FactorJudgeAdapter.reference_images(cfg)[1]).features
        act = self.store.layout.act_samples  # the run's images whose activations the store holds
        self.run_values = self.judge.judge(from_uint8(self.store.images(act.start, act.stop))).factors  # [N, F]
        self.saes = {(r["layer"], r["variant"]): r for r in self.wh.query(
            "SELECT sae_id, layer, variant, path FROM saes WHERE site = 'resid'").to_pylist()}
        self._loaded, self._means, self._before = {}, {}, {}
        self.done = {}
        if (out / "results.jsonl").exists():
            for line in (out / "results.jsonl").read_text().splitlines():
                r = json.loads(line)
                self.done[r["key"]] = r

    # --- sampling and judging -----------------------------------------------------------------------

    def code(self, codes: np.ndarray) -> np.ndarray:
        """Condition index (grid row) of factor codes [N, 4]."""
        sizes = [len(f.values) for f in FACTORS]
        idx = np.zeros(len(codes), np.int64)
        for j, size in enumerate(sizes):
            idx = idx * size + codes[:, j]
        return idx

    def sample(self, ids: np.ndarray, conds: np.ndarray, hooks_for=None, refs: tuple | None = None,
               renorm: float | None = None) -> np.ndarray:
        """Images [N, 3, H, W]; ``hooks_for(slice)`` gives the hooks of one batch; ``refs`` (ids, conds) are
        appended to each batch as style references and dropped from the result; ``renorm``: the sampler's
        CFG renormalisation (None: off)."""
        out = []
        for a in range(0, len(ids), self.batch):
            sl = slice(a, a + self.batch)
            b_ids, b_conds = ids[sl], conds[sl]
            if refs is not None:
                b_ids, b_conds = np.concatenate([b_ids, refs[0][sl]]), np.concatenate([b_conds, refs[1][sl]])
            hooks = hooks_for(sl) if hooks_for else []
            with contextlib.ExitStack() as stack:
                for h in hooks:
                    stack.enter_context(h)
                images = self.samplers[renorm].sample(b_ids.tolist(), b_conds.tolist(),
                                             observer=Observers(hooks) if hooks else None).images
            out.append(images[: len(ids[sl])])
        return np.concatenate(out)

    def judged(self, images: np.ndarray) -> dict:
        v = self.judge.judge(images)
        return {"values": v.factors, "fd": frechet_distance(v.features, self.real)}

    # --- the methods' ingredients -------------------------------------------------------------------

    def sae(self, layer: int, variant: str):
        key = (layer, variant)
        if key not in self._loaded:
            self._loaded[key] = SparseAutoencoder.load(self.saes[key]["path"]).eval()
        return self._loaded[key]

    def latents_of(self, layer: int, variant: str, factor: str, value: str) -> list[int]:
        return [r["feature_id"] for r in self.wh.query(
            "SELECT feature_id FROM feature_factors WHERE sae_id = ? AND factor = ? AND step = -1 AND best_value = ? "
            "AND lift > 1 ORDER BY normalized_mi DESC LIMIT ?",
            [self.saes[layer, variant]["sae_id"], factor, value, N_FEATURES]).to_pylist()]

    def means(self, layer: int, step: int, f: int) -> np.ndarray:
        """[n_values, d] mean block output per value of factor f (as the judge sees the run's images)."""
        if (layer, step, f) not in self._means:
            acts = self.store.read_step("resid", layer, step)  # [N, P, d]
            self._means[layer, step, f] = value_means(acts, self.run_values[:, f], len(FACTORS[f].values))
        return self._means[layer, step, f]

    def sae_hooks(self, variant, layer, window, strength, f, a, b, branch="both"):
        names = FACTORS[f].values
        picks = {v: self.latents_of(layer, variant, FACTOR_NAMES[f], names[v]) for v in range(len(names))}
        sae = self.sae(layer, variant)

        def hooks_for(sl):
            rows_a, rows_b = [picks[int(v)] for v in a[sl]], [picks[int(v)] for v in b[sl]]
            units = feature_units(self.wh, self.saes[layer, variant]["sae_id"], sorted({x for r in rows_b for x in r}))
            zero = EditHook(self.model, layer, sae, EditSpec("zero", (), 0.0, window, branch=branch), self.steps,
                            row_features=rows_a)
            add = EditHook(self.model, layer, sae, EditSpec("add", (), strength, window, branch=branch), self.steps,
                           row_features=rows_b, feature_units=units)
            return [zero, add]
        return hooks_for

    def dim_hooks(self, layer, window, strength, pairs, branch="both"):
        """pairs: [(f, a [N], b [N])]: the direction of each row sums b - a over the factors."""
        def hooks_for(sl):
            dirs = {}
            for step in range(window.start, window.end + 1):
                d = 0.0
                for f, a, b in pairs:
                    mu = self.means(layer, step, f)
                    d = d + np.nan_to_num(mu[b[sl]] - mu[a[sl]])  # [n, D]; a value never shown: no push
                dirs[step] = d
            return [SteerHook(self.model, layer, dirs, strength, branch=branch)]
        return hooks_for

    def style_hooks(self, variant, layer, window, strength, n_refs):
        sae = self.sae(layer, variant)
        feats = sorted({r["feature_id"] for r in self.wh.query(
            "SELECT DISTINCT feature_id FROM feature_factors WHERE sae_id = ? AND step = -1 AND factor <> 'class' "
            "AND normalized_mi >= 0.05", [self.saes[layer, variant]["sae_id"]]).to_pylist()})

        def hooks_for(sl):
            spec = EditSpec("style", tuple(feats), strength, window, pooled=True)
            return [EditHook(self.model, layer, sae, spec, self.steps, n_references=n_refs(sl))]
        return hooks_for

    def before(self, n: int, references: bool = False, renorm: float | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
        """The first n held-out seeds, their asked factor codes (a shuffled factor grid: every value as often)
        and the judge's verdict on them unedited; ``references``: other seeds and prompts, for style."""
        if (n, references, renorm) not in self._before:
            rng = np.random.default_rng(1 if references else 0)
            ids = np.arange(n, dtype=np.int64) + (100_000 if references else 0)
            asked = self.grid[rng.permutation(len(self.grid))[np.arange(n) % len(self.grid)]]  # [n, 4]
            self._before[n, references, renorm] = (ids, asked, self.judged(self.sample(ids, self.code(asked),
                                                                                       renorm=renorm)))
        return self._before[n, references, renorm]

    # --- cells --------------------------------------------------------------------------------------

    def record(self, key: str, row: dict) -> dict:
        row = {"key": key, **row}
        self.done[key] = row
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row

    def edit(self, kind: str, method: str, layer: int | None, window: str | None, strength: float | None,
             n: int, renorm: float | None = None, branch: str = "both") -> dict:
        """One cell: edit `kind` (a factor name, or "style") by `method` on the first n held-out seeds;
        ``renorm``: CFG renormalisation of the sampler (None: off), ``branch``: the CFG halves edited."""
        key = f"{kind}|{method}|L{layer}|{window}|{strength}|n{n}"
        key += (f"|renorm{renorm}" if renorm is not None else "") + (f"|{branch}" if branch != "both" else "")
        if key in self.done:
            return self.done[key]
        ids, asked, before = self.before(n, renorm=renorm)
        rng = np.random.default_rng(1)
        t0 = time.perf_counter()
        win = StepWindow.named(window, self.steps) if window else None
        if kind == "style":
            if branch != "both":
                raise ValueError("the style op edits both CFG halves (target and reference share the pass)")
            ref_ids, ref_asked, ref = self.before(n, references=True, renorm=renorm)
            target = before["values"].copy()
            target[:, STYLE] = ref["values"][:, STYLE]
            changed = list(STYLE)
            refs = (ref_ids, self.code(ref_asked))
            if method == "prompt":
                want = ref_asked.copy()
                want[:, 0] = asked[:, 0]
                after = self.sample(ids, self.code(want), renorm=renorm)
            elif method == "dim":
                pairs = [(f, before["values"][:, f], ref["values"][:, f]) for f in STYLE]
                after = self.sample(ids, self.code(asked), self.dim_hooks(layer, win, strength, pairs), renorm=renorm)
            else:
                after = self.sample(ids, self.code(asked), self.style_hooks(method, layer, win, strength,
                                                                             lambda sl: len(ids[sl])), refs=refs,
                                    renorm=renorm)
        else:
            f = FACTOR_NAMES.index(kind)
            size = len(FACTORS[f].values)
            a = asked[:, f]
            b = (a + 1 + rng.integers(size - 1, size=n)) % size  # another value
            target = before["values"].copy()
            target[:, f] = b
            changed = [f]
            if method == "prompt":
                want = asked.copy()
                want[:, f] = b
                after = self.sample(ids, self.code(want), renorm=renorm)
            elif method == "dim":
                after = self.sample(ids, self.code(asked), self.dim_hooks(layer, win, strength, [(f, a, b)], branch),
                                    renorm=renorm)
            else:
                after = self.sample(ids, self.code(asked), self.sae_hooks(method, layer, win, strength, f, a, b, branch),
                                    renorm=renorm)
        got = self.judged(after)
        keep = [j for j in range(len(FACTORS)) if j not in changed]
        # images whose targeted factors already showed the target (a style reference like the target, or a
        # thickness the model drew wrong) are no test of the edit
        eligible = (target[:, changed] != before["values"][:, changed]).any(1)
        success = (got["values"][:, changed] == target[:, changed]).all(1)[eligible]  # [E]
        same = (got["values"] == before["values"])[eligible]  # [E, F] each factor as it was
        style_kept = [j for j in keep if j != 0]  # the model draws these; its class is not the one asked
        return self.record(key, {
            "kind": kind, "method": method, "layer": layer, "window": window, "strength": strength, "n": n,
            "cfg_renorm": renorm, "branch": branch,
            "eligible": int(eligible.sum()), "success": float(success.mean()),
            "preserved": float(same[:, keep].mean()), "preserved_style": float(same[:, style_kept].mean()) if style_kept else None,
            "kept_class": float(same[:, 0].mean()) if 0 in keep else None,
            "both": float((success & same[:, style_kept].all(1)).mean()), "fd_before": before["fd"],
            "fd_after": got["fd"],
            "seconds": round(time.perf_counter() - t0, 1)})


def best_settings(bench: Bench, layers: list[int], n: int) -> dict[str, tuple]:
    """Each method's (layer, window, strength) with the most colour edits that succeed and preserve."""
    best = {}
    for method, strengths in SEARCH.items():
        cells = [bench.edit("colour", method, layer, window, s, n) for layer in layers for window in WINDOWS
                 for s in strengths]
        top = max(cells, key=lambda r: (r["both"], r["success"]))
        best[method] = (top["layer"], top["window"], top["strength"])
    return best


def print_table(rows: list[dict]) -> None:
    print("\n| edit | method | layer | window | strength | renorm | branch | success | preserved | preserved_style "
          "| kept_class | both | FD before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kept = "-" if r["kept_class"] is None else f"{r['kept_class']:.3f}"
        style = "-" if r["preserved_style"] is None else f"{r['preserved_style']:.3f}"
        renorm = "off" if r.get("cfg_renorm") is None else r["cfg_renorm"]
        print(f"| {r['kind']} | {r['method']} | {r['layer']} | {r['window']} | {r['strength']} | {renorm} | "
              f"{r.get('branch', 'both')} | {r['success']:.3f} | {r['preserved']:.3f} | {style} | {kept} | "
              f"{r['both']:.3f} | {r['fd_before']:.0f} -> {r['fd_after']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/styled-digits.toml")
    p.add_argument("--seeds", type=int, default=200, help="held-out seeds per reported cell (>= 200 for the targets)")
    p.add_argument("--search-seeds", type=int, default=40, help="seeds per cell of the colour search")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--out", default="bench/out/factor_edits")
    p.add_argument("--cfg-renorm", type=float, default=1.0,
                   help="the CFG renormalisation cap of the renorm-on colour cells (|guided| <= cap x |cond|)")
    args = p.parse_args()
    if not args.cfg_renorm > 0:
        p.error(f"--cfg-renorm must be > 0 (the cap on |guided| / |cond|; 1 rescales to the conditional norm), "
                f"got {args.cfg_renorm}")
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.config, out, args.batch, args.cfg_renorm)
    layers = sorted({layer for layer, _ in bench.saes})
    best = best_settings(bench, layers, args.search_seeds)
    rows = []
    for kind in ("colour", "thickness", "background", "class", "style"):
        for method in ("tide", "topk", "dim", "prompt"):
            layer, window, strength = best[method] if method != "prompt" else (None, None, None)
            if kind == "style" and method in ("tide", "topk"):
                strength = 1.0  # the style op: 1 moves each latent all the way to the reference's level
            rows.append(bench.edit(kind, method, layer, window, strength, args.seeds))
    print_table(rows)
    # the colour cells again: CFG renormalisation on (before and after alike), and the edit on the
    # conditional half only; each method at its searched layer, window and strength
    variants = []
    for method in ("tide", "topk", "dim", "prompt"):
        layer, window, strength = best[method] if method != "prompt" else (None, None, None)
        variants.append(bench.edit("colour", method, layer, window, strength, args.seeds, renorm=args.cfg_renorm))
        if method != "prompt":
            variants.append(bench.edit("colour", method, layer, window, strength, args.seeds, branch="cond"))
    print(f"\nColour edit, CFG renormalisation (cap {args.cfg_renorm}) and the conditional half only:")
    print_table([r for r in rows if r["kind"] == "colour"] + variants)
    # what scripts/results.py --styled puts in docs/FINDINGS.md: the cells this run reported
    (out / "report.json").write_text(json.dumps({"seeds": args.seeds, "cfg_renorm": args.cfg_renorm, "rows": rows,
                                                 "variants": variants}, indent=1))
    colour = [r for r in rows + variants if r["kind"] == "colour" and r["method"] != "prompt"]
    top = max(colour, key=lambda r: r["success"])
    print(f"best_colour_edit_success={top['success']:.3f} ({top['method']}, layer {top['layer']}, {top['window']}, "
          f"strength {top['strength']}, renorm {top.get('cfg_renorm') or 'off'}, branch {top.get('branch', 'both')}; "
          f"preserved {top['preserved']:.3f}; prompt edit "
          f"{next(r['success'] for r in rows if r['kind'] == 'colour' and r['method'] == 'prompt'):.3f})")


if __name__ == "__main__":
    main()
