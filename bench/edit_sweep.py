"""Feature-guided editing, measured on the default model with the judge (docs/FINDINGS.md, "Feature-guided
editing").

    .venv/bin/python bench/edit_sweep.py [--config tide.toml] [--layers 3,1,5] [--out bench/out/edit_sweep]

Reads a copy of the warehouse (another process may hold the file), the committed DiT, the trained SAEs and
the judge. All edits use the same 64 held-out samples (ids of the run's last shard) and their seeds:

* boost: each sample is pushed towards one other class c (a fixed derangement of the classes) by adding
  the n most class-c-selective features (`v_features`) at every token, strength in units of each
  feature's mean activation; rate = share of samples the judge now calls c.
* zero: each sample's own class c loses its n most selective features; rate = share no longer called c.
  The strength axis of an ablation is how many features go (zero has no other knob); `add` with a
  negative strength is measured beside it.
* style: 32 samples each take all latents of a paired reference (strength 1 = copy) in one window; ink
  (stroke mass) and slant of the result against the reference's and the original's.

Every (layer, op, strength, window) is one batch; results go to <out>/results.jsonl as they finish, and a
rerun skips what is there. `--report` renders the table, plot and example grid from them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.project import Project  # noqa: E402

WINDOWS = ("early", "middle", "late", "all")
N_FEATURES = 8
MIN_FIRE_RATE = 0.001


def ink(images: np.ndarray) -> np.ndarray:
    """Stroke mass per image: the mean of pixel intensity in [0, 1] (thicker strokes -> more ink)."""
    return (images[..., 0].astype(np.float64) / 255.0).mean(axis=(1, 2))


def roughness(images: np.ndarray) -> np.ndarray:
    """Mean absolute difference between neighbouring pixels (intensity in [0, 1]): sampled digits are smooth
    strokes, a destroyed image is texture. The judge is confident on textures too, so a flip only counts
    when the result is no rougher than the roughest unedited sample."""
    x = images[..., 0].astype(np.float64) / 255.0  # [n, H, W]
    return np.abs(np.diff(x, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(x, axis=2)).mean(axis=(1, 2))


def slant(images: np.ndarray) -> np.ndarray:
    """Slant per image from intensity-weighted second moments: cov(x, y) / var(y), i.e. how far x moves
    per row going down (positive = the top leans right, as in italic writing)."""
    w = images[..., 0].astype(np.float64) / 255.0  # [n, H, W]
    h, wd = w.shape[1:]
    ys, xs = np.mgrid[0:h, 0:wd]
    m = w.sum(axis=(1, 2)).clip(1e-9)
    my = (w * ys).sum(axis=(1, 2)) / m
    mx = (w * xs).sum(axis=(1, 2)) / m
    cov = (w * (xs - mx[:, None, None]) * (ys - my[:, None, None])).sum(axis=(1, 2)) / m
    var = (w * (ys - my[:, None, None]) ** 2).sum(axis=(1, 2)) / m
    return -cov / var.clip(1e-9)  # rows grow downwards: a right-leaning top has x falling as y grows


class Sweep:
    def __init__(self, project: Project, wh, out: Path):
        from pipelines.context import RunContext
        from pipelines.stages.edit import open_session
        from pipelines.stages.edit_plan import resolve_sae, with_edit

        self.project, self.wh, self.out = project, wh, out
        self.done = {}
        if (out / "results.jsonl").exists():
            for line in (out / "results.jsonl").read_text().splitlines():
                r = json.loads(line)
                self.done[r["key"]] = r
        self.sessions = {}
        def context(layer: int) -> RunContext:
            ctx = RunContext(with_edit(project, layer=layer))
            ctx.warehouse = wh  # the copy
            return ctx

        self._open = lambda layer, uncond: open_session(context(layer), resolve_sae(context(layer)),
                                                        unconditional=uncond)
        self._before = {False: {}, True: {}}  # shared by layers: unedited images do not depend on the SAE
        self._features: dict[tuple[int, int], dict[int, list[int]]] = {}

    def session(self, layer: int, uncond: bool = False):
        if (layer, uncond) not in self.sessions:
            s = self._open(layer, uncond)
            s._before = self._before[uncond]
            self.sessions[layer, uncond] = s
        return self.sessions[layer, uncond]

    def features(self, layer: int, n: int = N_FEATURES) -> dict[int, list[int]]:
        """Each class's n most selective features (queried once per layer and n)."""
        from pipelines.stages.edit_plan import select_features

        if (layer, n) not in self._features:
            sid = self.session(layer).target.sae_id
            self._features[layer, n] = {c: select_features(self.wh, sid, c, n, MIN_FIRE_RATE) for c in range(10)}
        return self._features[layer, n]

    def record(self, key: str, row: dict) -> None:
        row = {"key": key, **row}
        self.done[key] = row
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                          if k not in ("key", "examples")}), flush=True)

    def class_edit(self, layer: int, kind: str, op: str, strength: float, window: str, n: int, ids: np.ndarray,
                   uncond: bool = False, spatial: bool = False):
        """boost: push each sample to another class; remove: take its own class's features away. A sample's
        class is its label, or (unconditional) the judge's verdict on the unedited image."""
        from pipelines.stages.edit import run_edit
        from pipelines.stages.edit_plan import feature_maps, feature_units
        from tide_core.edit import EditSpec, StepWindow

        key = ("U" if uncond else "") + f"L{layer}|{kind}|{op}|{strength:g}|{window}|n{n}" + ("|map" if spatial else "")
        if key in self.done:
            return self.done[key]
        s = self.session(layer, uncond)
        feats = self.features(layer, n)
        y = s.before(ids).pred if uncond else s.class_of(ids)
        target = (y + 1 + (ids // 10) % 9) % 10 if kind == "boost" else y
        rows = [feats[int(c)] for c in target]
        used = sorted({f for r in rows for f in r})
        units = feature_units(self.wh, s.target.sae_id, used) if op == "add" else None
        maps = feature_maps(self.wh, s.target.sae_id, used) if spatial else None
        spec = EditSpec(op, (), strength, StepWindow.named(window, s.num_steps))
        t0 = time.perf_counter()
        r = run_edit(s, spec, ids, row_features=rows, units=units, maps=maps)
        b, a = r.before.pred, r.after.pred
        ok = (b != target) if kind == "boost" else (b == target)
        hit = (a == target) if kind == "boost" else (a != target)
        mse = float(((r.after.images.astype(float) - r.before.images.astype(float)) / 255.0).__pow__(2).mean())
        valid = roughness(r.after.images) <= roughness(r.before.images).max()
        return self.record(key, {
            "layer": layer, "unconditional": uncond, "spatial": spatial, "kind": kind, "op": op, "strength": strength, "window": window, "n_features": n,
            "rate": float(hit[ok].mean()), "eligible": int(ok.sum()), "changed": float((a != b).mean()),
            "valid": float(valid.mean()), "clean_rate": float((hit & valid)[ok].mean()),
            "conf_after": float(r.after.conf.mean()), "pixel_mse": mse, "delta_ratio": r.delta_ratio,
            "seconds": round(time.perf_counter() - t0, 1), "edit_id": r.edit_id,
            "examples": {"ids": ids[:6].tolist(), "target": target[:6].tolist(),
                         "before": r.before.images[:6, ..., 0].tolist(),
                         "after": r.after.images[:6, ..., 0].tolist()}})

    def style(self, layer: int, strength: float, window: str, ids: np.ndarray, refs: np.ndarray,
              pooled: bool = False):
        from pipelines.stages.edit import run_edit
        from tide_core.edit import EditSpec, StepWindow

        key = f"L{layer}|style|{strength:g}|{window}" + ("|pooled" if pooled else "")
        if key in self.done:
            return self.done[key]
        s = self.session(layer)
        t0 = time.perf_counter()
        spec = EditSpec("style", (), strength, StepWindow.named(window, s.num_steps), pooled=pooled)
        r = run_edit(s, spec, ids, reference_ids=refs)
        ref = r.references
        row = {"layer": layer, "kind": "style", "pooled": pooled, "strength": strength, "window": window,
               "seconds": round(time.perf_counter() - t0, 1), "edit_id": r.edit_id,
               "keeps_class": float((r.after.pred == r.before.pred).mean()),
               "takes_ref_class": float((r.after.pred == ref.pred).mean()),
               "examples": {"ids": ids[:6].tolist(), "refs": refs[:6].tolist(),
                            "before": r.before.images[:6, ..., 0].tolist(),
                            "reference": ref.images[:6, ..., 0].tolist(),
                            "after": r.after.images[:6, ..., 0].tolist()}}
        for name, stat in (("ink", ink), ("slant", slant)):
            o, a, f = stat(r.before.images), stat(r.after.images), stat(ref.images)
            row[f"{name}_corr_orig_ref"] = float(np.corrcoef(o, f)[0, 1])
            row[f"{name}_corr_after_ref"] = float(np.corrcoef(a, f)[0, 1])
            # share of the original-to-reference gap the edit closed (1 = result matches the reference)
            row[f"{name}_gap_closed"] = float(1 - np.abs(a - f).mean() / np.abs(o - f).mean())
        return self.record(key, row)


def run_sweep(args) -> None:
    from storage import Warehouse

    project = Project.load(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="edit_sweep-"))
    shutil.copy(project.duckdb_path, tmp / "warehouse.duckdb")  # never hold the shared file's lock
    wh = Warehouse(tmp / "warehouse.duckdb")
    sw = Sweep(project, wh, out)
    layers = [int(x) for x in args.layers.split(",")]
    main = layers[0]
    ids = sw.session(main).heldout[:64]
    t0 = time.perf_counter()
    for uncond in (False, True):
        t1 = time.perf_counter()
        sw.session(main, uncond).before(ids)
        print(f"unedited ({'no label' if uncond else 'class label'}): {len(ids)} samples in "
              f"{time.perf_counter() - t1:.0f}s", flush=True)
    # Without a label, nothing re-injects the class at every block, so the features carry it alone.
    for uncond in (False, True):
        for window in WINDOWS:
            for strength in (8.0, 32.0):  # every token alike
                sw.class_edit(main, "boost", "add", strength, window, N_FEATURES, ids, uncond)
            for strength in (4.0, 16.0, 64.0):  # where the feature usually fires (top-image heatmaps)
                sw.class_edit(main, "boost", "add", strength, window, N_FEATURES, ids, uncond, spatial=True)
        sw.class_edit(main, "boost", "add", 256.0, "early", N_FEATURES, ids, uncond, spatial=True)
        sw.class_edit(main, "boost", "add", 64.0, "early", 32, ids, uncond, spatial=True)
        for n in (8, 32, 128):
            sw.class_edit(main, "remove", "zero", 0.0, "all", n, ids, uncond)
        for window in WINDOWS:
            sw.class_edit(main, "remove", "add", -8.0, window, N_FEATURES, ids, uncond)
        for strength, window in ((-16.0, "early"), (-16.0, "all"), (-64.0, "all")):
            sw.class_edit(main, "remove", "add", strength, window, N_FEATURES, ids, uncond, spatial=True)
    for layer in layers[1:]:  # the other layers at the settings that did most on the main one
        for uncond in (False, True):
            sw.class_edit(layer, "boost", "add", 64.0, "early", N_FEATURES, ids, uncond, spatial=True)
            sw.class_edit(layer, "remove", "add", -16.0, "all", N_FEATURES, ids, uncond, spatial=True)
            sw.class_edit(layer, "remove", "zero", 0.0, "all", 128, ids, uncond)
    targets, refs = ids[:32], ids[32:64]
    for window in WINDOWS:
        sw.style(main, 1.0, window, targets, refs)
    for window in WINDOWS:
        sw.style(main, 1.0, window, targets, refs, pooled=True)
    print(f"sweep done in {time.perf_counter() - t0:.0f}s; results in {out / 'results.jsonl'}")


def report(args) -> None:
    """Markdown tables, the plot and example grids from results.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    img_dir = Path(args.img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    def what(r):
        how = ("zero" if r["op"] == "zero" else "add" + (" at map" if r.get("spatial") else " everywhere"))
        return f"{'boost to c' if r['kind'] == 'boost' else 'remove c'}: {how}, {r['n_features']} feat."

    edits = [r for r in rows if r["kind"] != "style"]
    edits.sort(key=lambda r: (r.get("unconditional", False), r["kind"], r["layer"] != 3, r["op"],
                              bool(r.get("spatial")), r["n_features"], WINDOWS.index(r["window"]), r["strength"]))
    print("| label | layer | edit | strength | window | hit rate | clean hit rate | still a digit | changed "
          "| pixel MSE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in edits:
        print(f"| {'none' if r.get('unconditional') else 'class'} | {r['layer']} | {what(r)} | {r['strength']:g} | "
              f"{r['window']} | {pct(r['rate'])} | {pct(r.get('clean_rate'))} | {pct(r.get('valid'))} | "
              f"{pct(r['changed'])} | {r['pixel_mse']:.3f} |")
    print()
    style = [r for r in rows if r["kind"] == "style"]
    print("| copy | window | keeps class | takes ref. class | ink corr. with ref. (orig -> result) | ink gap closed "
          "| slant corr. (orig -> result) | slant gap closed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in style:
        print(f"| {'pooled' if r.get('pooled') else 'token by token'} | {r['window']} | {pct(r['keeps_class'])} | "
              f"{pct(r['takes_ref_class'])} | {r['ink_corr_orig_ref']:.2f} -> {r['ink_corr_after_ref']:.2f} | "
              f"{pct(r['ink_gap_closed'])} | {r['slant_corr_orig_ref']:.2f} -> {r['slant_corr_after_ref']:.2f} | "
              f"{pct(r['slant_gap_closed'])} |")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for uncond, style_ in ((False, "-"), (True, "--")):
        for w in WINDOWS:
            pts = sorted((r["strength"], r["clean_rate"]) for r in edits if r["kind"] == "boost"
                         and r.get("spatial") and r["n_features"] == N_FEATURES and r["window"] == w
                         and r.get("unconditional", False) == uncond and r["layer"] == 3)
            if pts:
                axes[0].plot([q[0] for q in pts], [q[1] for q in pts], style_, marker="o",
                             color=f"C{WINDOWS.index(w)}", label=f"{w}, {'no label' if uncond else 'class label'}")
    axes[0].set(xscale="log", xlabel="strength (x mean activation, at the map's peak)", ylabel="clean hit rate",
                title="boost class c's 8 most selective features (layer 3)", ylim=(0, 0.5))
    axes[0].legend(fontsize=6, ncol=2)
    settings = [("zero", False, 0.0, "all", 128), ("add", False, -8.0, "early", 8), ("add", False, -8.0, "all", 8),
                ("add", True, -16.0, "early", 8), ("add", True, -16.0, "all", 8), ("add", True, -64.0, "all", 8)]
    x = np.arange(len(settings))
    for k, uncond in enumerate((False, True)):
        got = {(r["op"], bool(r.get("spatial")), r["strength"], r["window"], r["n_features"]): r for r in edits
               if r["kind"] == "remove" and r["layer"] == 3 and r.get("unconditional", False) == uncond}
        raw = [got[st]["rate"] if st in got else 0 for st in settings]
        clean = [got[st]["clean_rate"] if st in got else 0 for st in settings]
        off = -0.2 if k == 0 else 0.2
        name = "no label" if uncond else "class label"
        axes[1].bar(x + off, raw, 0.4, color=f"C{k}", alpha=0.35, label=f"{name}: no longer c")
        axes[1].bar(x + off, clean, 0.4, color=f"C{k}", label=f"{name}: ... and still a digit")
    axes[1].set_xticks(x, [f"{op} {st:g}{' map' if sp else ''}\n{n} feat., {w}" if op == "add" else f"zero\n{n} feat., {w}"
                           for op, sp, st, w, n in settings], fontsize=6)
    axes[1].set(title="remove own class c (layer 3)", ylim=(0, 1))
    axes[1].legend(fontsize=6)
    x = np.arange(len(style))
    axes[2].bar(x - 0.2, [r["ink_gap_closed"] for r in style], 0.4, label="ink gap to reference closed")
    axes[2].bar(x + 0.2, [r["keeps_class"] for r in style], 0.4, label="keeps its class")
    axes[2].set_xticks(x, [f"{'pooled' if r.get('pooled') else 'tokens'}\n{r['window']}" for r in style], fontsize=6)
    axes[2].set(title="style: latents of a paired reference (layer 3)", ylim=(-1, 1.05))
    axes[2].axhline(0, color="k", lw=0.5)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(img_dir / "editing_sweep.png", dpi=90)
    plt.close(fig)

    if style:  # rows = samples; columns = original, reference, result per setting
        cols = [("original", style[0]["examples"]["before"]), ("reference", style[0]["examples"]["reference"])]
        cols += [(f"{'pooled' if r.get('pooled') else 'copy'}, {r['window']}", r["examples"]["after"]) for r in style]
        grid(cols, img_dir / "editing_style_examples.png", "style transfer, layer 3, strength 1")
    picks = [max((r for r in edits if r["kind"] == k and "clean_rate" in r), key=lambda r: r["clean_rate"])
             for k in ("boost", "remove")]
    cols = [("no label, unedited" if picks[0].get("unconditional") else "unedited", picks[0]["examples"]["before"])]
    for r in picks:
        cols.append((f"{r['kind']} {r['strength']:g}\n{r['window']}, L{r['layer']}", r["examples"]["after"]))
    grid(cols, img_dir / "editing_class_examples.png",
         f"best clean settings; boost targets {picks[0]['examples']['target']}")


def grid(cols: list, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    n = len(cols[0][1])
    fig, axes = plt.subplots(n, len(cols), figsize=(1.1 * len(cols), 1.1 * n + 0.4), squeeze=False)
    for j, (name, images) in enumerate(cols):
        axes[0, j].set_title(name, fontsize=6)
        for i in range(n):
            axes[i, j].imshow(np.array(images[i]), cmap="gray", vmin=0, vmax=255)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    fig.suptitle(title, fontsize=7)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("--layers", default="3,1,5", help="first = the layer of the full grid")
    p.add_argument("--out", default="bench/out/edit_sweep")
    p.add_argument("--report", action="store_true", help="render tables and plots from the results")
    p.add_argument("--img-dir", default="docs/img")
    args = p.parse_args()
    import torch

    torch.set_num_threads(2)
    report(args) if args.report else run_sweep(args)


if __name__ == "__main__":
    main()
