"""Feature-guided editing behind `tide edit` and the `edits` asset.

1. Resolve what to edit from the warehouse: the SAE (checked against the configured model), the features
   most selective for a class (`v_features`), their units (mean activation), the samples.
2. ``EditSession``: the DiT, run sampler, judge and SAE, loaded once; it samples the same seeds without the
   edit (cached, shared by every edit of a sweep) and with it, and judges both.
3. Publish: one `edits` row per (edit, sample), a before/after grid PNG under <warehouse>/edits/.

Every check that can fail runs before the DiT is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.capture_ops import open_store
from pipelines.project import Project, content_key
from pipelines.sae_ops import SITE, load_digit_judge, missing_checkpoint, run_sampler, split_samples
from storage.activation_store import ActivationStore
from storage.warehouse import SaeRecord, UnknownSaeError
from tide_core.config import EditConfig, parse_config
from tide_core.edit import EditError, EditSpec, StepWindow

Log = Callable[[str], None]
UNIT_OPS = ("add", "clamp")  # ops whose strength is in units of each feature (units, spatial maps)


def suppresses(op: str, strength: float) -> bool:
    """Whether an edit pushes its features down (towards "not target_class") rather than up: zero, scale
    < 1, add < 0, clamp <= 0. Style moves towards a reference and neither boosts nor suppresses a class."""
    return (op == "zero" or (op == "scale" and strength < 1) or (op == "add" and strength < 0)
            or (op == "clamp" and strength <= 0))


# ---------------------------------------------------------------------------------------------------------
# 1. What to edit
# ---------------------------------------------------------------------------------------------------------


def with_edit(project: Project, **overrides) -> Project:
    """The project with `[edit]` fields replaced (e.g. from the CLI), validated like the config file."""
    data = project.config.model_dump(mode="json")
    data["edit"] = {**data["edit"], **{k: v for k, v in overrides.items() if v is not None}}
    return dataclasses.replace(project, config=parse_config(data, origin="tide edit arguments"))


def resolve_sae(project: Project, wh, store: ActivationStore | None = None) -> SaeRecord:
    """edit.sae_id, or the SAE of edit.layer / edit.variant trained on the current store's run (the `saes`
    row; its sample ids are the run's), with its checkpoint on disk."""
    e = project.config.edit
    store = store if store is not None else open_store(project)
    run_id = store.provenance["run_id"]
    if e.sae_id is not None:
        try:
            rec = wh.require_sae(e.sae_id)
        except UnknownSaeError as err:
            raise EditError(str(err)) from None
    else:
        layers = sorted(project.config.capture.layers)
        layer = e.layer if e.layer is not None else layers[len(layers) // 2]
        variant = e.variant or project.config.sae.variants[0]
        ids = wh.query("SELECT sae_id FROM saes WHERE run_id = ? AND layer = ? AND variant = ? AND site = ? "
                       "ORDER BY created_at DESC LIMIT 1", [run_id, layer, variant, SITE]).column(0).to_pylist()
        if not ids:
            raise EditError(f"no {variant} SAE of layer {layer} for run {run_id} in the warehouse: "
                            "materialize the `sae` asset for that layer (or pass --sae)")
        rec = wh.require_sae(ids[0])
    if rec.site != SITE:
        raise EditError(f"SAE {rec.sae_id} was trained on the {rec.site!r} site; editing changes the block "
                        f"output: pick a {SITE!r} SAE")
    if rec.run_id != run_id:
        raise EditError(f"SAE {rec.sae_id} was trained on run {rec.run_id}, but the configured store is run "
                        f"{run_id}: its sample ids would name other images. Use an SAE of run {run_id}")
    model_hash = wh.query("SELECT model_hash FROM runs WHERE run_id = ?", [rec.run_id]).column(0).to_pylist()
    want = store.provenance["model"]["config_hash"]
    if model_hash and model_hash[0] and model_hash[0] != want:
        raise EditError(f"SAE {rec.sae_id} comes from model {model_hash[0]}, but the configured model is "
                        f"{want}: use an SAE trained on this model's activations")
    if problem := missing_checkpoint(rec):
        raise EditError(problem)
    return rec


def select_features(wh, sae_id: str, class_id: int, n: int, min_fire_rate: float = 0.0) -> list[int]:
    """The n latents most selective for class_id (top_class = class_id, highest class_selectivity first),
    ignoring those firing on fewer than min_fire_rate of tokens."""
    rows = wh.query("SELECT feature_id FROM v_features WHERE sae_id = ? AND top_class = ? AND fire_rate >= ? "
                    "AND class_selectivity IS NOT NULL ORDER BY class_selectivity DESC, fire_rate DESC, "
                    "feature_id LIMIT ?", [sae_id, class_id, min_fire_rate, n]).column(0).to_pylist()
    if not rows:
        have = wh.query("SELECT count(*) FROM features WHERE sae_id = ?", [sae_id]).column(0)[0].as_py()
        if not have:
            raise EditError(f"the `features` table has no rows for SAE {sae_id}: materialize the feature "
                            "statistics first, or name the features (--features / edit.feature_ids)")
        raise EditError(f"no feature of SAE {sae_id} has top_class {class_id} and fire_rate >= {min_fire_rate}: "
                        "lower edit.min_fire_rate (--min-fire-rate) or check the class id")
    return [int(f) for f in rows]


def feature_units(wh, sae_id: str, feature_ids: Sequence[int]) -> dict[int, float]:
    """Each feature's mean activation when it fires (the unit of add / clamp strengths, units=mean_act)."""
    rows = wh.query("SELECT feature_id, mean_act FROM features WHERE sae_id = ? AND list_contains(?, feature_id)",
                    [sae_id, [int(f) for f in feature_ids]]).to_pylist()
    units = {int(r["feature_id"]): r["mean_act"] for r in rows}
    missing = [int(f) for f in feature_ids if not units.get(int(f))]
    if missing:
        raise EditError(f"features {missing[:10]} of SAE {sae_id} have no mean activation in the `features` "
                        "table (never fired, or statistics not computed): use units='absolute' (--units absolute)")
    return units


def feature_maps(wh, sae_id: str, feature_ids: Sequence[int]) -> dict[int, np.ndarray]:
    """Where each feature usually fires: the mean heatmap of its top images (`top_images`, scope overall),
    scaled to peak 1, one weight per token (row-major patch grid). Used to add a feature where it belongs
    instead of at every token."""
    rows = wh.query("SELECT feature_id, heatmap FROM top_images WHERE sae_id = ? AND scope = 'overall' "
                    "AND heatmap IS NOT NULL AND list_contains(?, feature_id)",
                    [sae_id, [int(f) for f in feature_ids]]).to_pylist()
    sums: dict[int, np.ndarray] = {}
    for r in rows:
        h = np.asarray(r["heatmap"], np.float64)
        sums[int(r["feature_id"])] = sums.get(int(r["feature_id"]), 0) + h
    maps = {f: m / m.max() for f, m in sums.items() if m.max() > 0}
    missing = [int(f) for f in feature_ids if int(f) not in maps]
    if missing:
        raise EditError(f"features {missing[:10]} of SAE {sae_id} have no top-image heatmaps: build the "
                        "feature statistics (top_images) first, or edit without spatial maps (edit.spatial = false)")
    return maps


# ---------------------------------------------------------------------------------------------------------
# 2. Sampling with and without the edit
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Judged:
    """Images with the judge's verdict (pred / conf are None without a judge)."""

    images: np.ndarray  # uint8 [n, H, W, C]
    pred: np.ndarray | None  # int64 [n]
    conf: np.ndarray | None  # float32 [n]


@dataclass
class EditSession:
    """Everything an edit needs, loaded once per SAE; ``before`` caches the unedited images by sample id."""

    target: SaeRecord
    sae: object
    sampler: object  # its cfg_renorm (None = off) applies to before and after images alike
    judge: object | None
    run_classes: list[int]
    heldout: np.ndarray  # int64 sample ids never used to train the SAE
    null_class: int | None = None  # set: sample unconditionally (this label, no guidance)
    _before: dict[int, tuple] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.sampler.num_steps

    def class_of(self, sample_ids: Sequence[int]) -> np.ndarray:
        """The label each sample is sampled with: its class in the run, or the null class."""
        from tide_core.sampling import class_for

        if self.null_class is not None:
            return np.full(len(sample_ids), self.null_class, np.int64)
        return np.array([class_for(int(i), self.run_classes) for i in sample_ids], np.int64)

    def judge_images(self, images_u8: np.ndarray) -> Judged:
        if self.judge is None:
            return Judged(images_u8, None, None)
        from tide_core.judge import judge_images
        from tide_core.sampling import from_uint8

        v = judge_images(self.judge, from_uint8(images_u8))
        return Judged(images_u8, v.pred, v.confidence)

    def sample(self, sample_ids: Sequence[int], observer=None, batch_size: int = 64) -> np.ndarray:
        """uint8 [n, H, W, C] images of the run's sample ids (their seeds and classes)."""
        from tide_core.sampling import to_uint8

        ids = np.asarray(sample_ids, np.int64)
        out = [self.sampler.sample(ids[i:i + batch_size], self.class_of(ids[i:i + batch_size]), observer=observer)
               .images for i in range(0, len(ids), batch_size)]
        return to_uint8(np.concatenate(out))

    def before(self, sample_ids: Sequence[int]) -> Judged:
        """Unedited images of these samples (sampled once per session, then cached)."""
        todo = [int(i) for i in dict.fromkeys(int(i) for i in sample_ids) if int(i) not in self._before]
        if todo:
            got = self.judge_images(self.sample(todo))
            for j, sid in enumerate(todo):
                self._before[sid] = (got.images[j], None if got.pred is None else got.pred[j],
                                     None if got.conf is None else got.conf[j])
        rows = [self._before[int(i)] for i in sample_ids]
        if rows[0][1] is None:
            return Judged(np.stack([r[0] for r in rows]), None, None)
        return Judged(np.stack([r[0] for r in rows]), np.array([r[1] for r in rows]), np.array([r[2] for r in rows]))


def open_session(project: Project, target: SaeRecord, cfg_renorm: float | None = None,
                 unconditional: bool = False, store: ActivationStore | None = None) -> EditSession:
    """unconditional: sample with the null class and no guidance, so the digit is decided by the noise
    and the features rather than by a label every block is conditioned on. cfg_renorm: the sampler's."""
    from tide_core.edit import check_sae_fits
    from tide_core.sae import SparseAutoencoder

    store = store if store is not None else open_store(project)
    sampler = run_sampler(project, cfg_renorm=cfg_renorm)
    if unconditional:
        sampler.guidance_scale = 1.0  # guidance needs a label to guide towards
    sae = SparseAutoencoder.load(target.path, device=sampler.bundle.device)
    check_sae_fits(sampler.bundle.transformer, target.layer, sae)
    split = split_samples(store, project.config.sae.heldout_fraction)
    return EditSession(target=target, sae=sae, sampler=sampler, judge=load_digit_judge(project),
                       run_classes=list(store.provenance["sampling"]["classes"]), heldout=split.heldout,
                       null_class=sampler.bundle.null_class if unconditional else None)


@dataclass(frozen=True)
class EditResult:
    """One edit applied to some samples: the same seeds before and after."""

    edit_id: str
    spec: EditSpec
    config: dict  # what `edits.config_json` stores
    sample_ids: np.ndarray  # int64 [n]
    class_ids: np.ndarray  # int64 [n] classes the samples were sampled for
    feature_ids: list[list[int]]  # per sample
    reference_ids: np.ndarray | None  # int64 [n] (style) or None
    target_class: int | None
    before: Judged
    after: Judged
    references: Judged | None  # style: the reference of each sample, unedited
    delta_ratio: float  # mean |dec(z') - dec(z)| / |x| over edited steps and tokens

    def rows(self, run_id: str) -> list[dict]:
        cfg = json.dumps(self.config, sort_keys=True)
        judged = self.before.pred is not None
        out = []
        for i, sid in enumerate(self.sample_ids):
            out.append({
                # An unconditional image shares the run sample's seed, not its label: no run row describes it.
                "sample_id": int(sid), "run_id": None if self.config["unconditional"] else run_id,
                "sae_id": self.config["sae_id"], "config_json": cfg,
                "op": self.spec.op, "feature_ids": self.feature_ids[i], "target_class": self.target_class,
                "reference_id": None if self.reference_ids is None else int(self.reference_ids[i]),
                "strength": float(self.spec.strength), "step_start": self.spec.window.start,
                "step_end": self.spec.window.end,
                "pred_before": int(self.before.pred[i]) if judged else None,
                "conf_before": float(self.before.conf[i]) if judged else None,
                "pred_after": int(self.after.pred[i]) if judged else None,
                "conf_after": float(self.after.conf[i]) if judged else None,
            })
        return out


def edit_id_of(config: dict) -> str:
    """Same config (SAE, op, features, strength, window, samples, sampler) -> same id, so reruns replace."""
    return "e" + content_key(config, 15)


def run_edit(session: EditSession, spec: EditSpec, sample_ids: Sequence[int], *,
             row_features: Sequence[Sequence[int]] | None = None, units: dict[int, float] | None = None,
             maps: dict[int, np.ndarray] | None = None, reference_ids: Sequence[int] | None = None,
             target_class: int | None = None) -> EditResult:
    """Sample ``sample_ids`` with the edit (references, for style, appended to the batch) and judge it
    against the cached unedited images of the same seeds."""
    from tide_core.edit import EditHook, StepRecord

    ids = np.asarray(sample_ids, np.int64)
    refs = None if reference_ids is None else np.asarray(reference_ids, np.int64)
    if refs is not None and len(refs) not in (1, len(ids)):
        raise EditError(f"give one reference for all samples or one per sample: {len(refs)} references for "
                        f"{len(ids)} samples")
    per_row = [list(f) for f in row_features] if row_features is not None else [list(spec.feature_ids)] * len(ids)
    hook = EditHook(session.sampler.bundle.transformer, session.target.layer, session.sae, spec, session.num_steps,
                    row_features=row_features, feature_units=units,
                    feature_maps=maps, n_references=0 if refs is None else len(refs))
    before = session.before(ids)
    batch = ids if refs is None else np.concatenate([ids, refs])
    with hook:
        # One batch: a style target and its reference must share the forward pass.
        images = session.sample(batch, observer=hook, batch_size=len(batch))[:len(ids)]
    after = session.judge_images(images)
    s = session.sampler
    config = {
        "sae_id": session.target.sae_id, "layer": session.target.layer, "op": spec.op,
        "feature_ids": per_row if row_features is not None else list(spec.feature_ids),
        "per_sample_features": row_features is not None, "strength": spec.strength,
        "window": [spec.window.start, spec.window.end], "branch": spec.branch, "cfg_renorm": s.cfg_renorm,
        "pooled": spec.pooled, "spatial": maps is not None,
        "units": {str(k): round(float(v), 6) for k, v in sorted((units or {}).items())},
        "target_class": target_class, "sample_ids": ids.tolist(),
        "reference_ids": None if refs is None else refs.tolist(),
        "sampler": {"scheduler": s.scheduler_name, "num_steps": s.num_steps, "guidance_scale": s.guidance_scale,
                    "seed": s.seed},
        "unconditional": session.null_class is not None,
    }
    ratio = StepRecord.mean_ratio(hook.records)
    paired = None if refs is None else refs[np.arange(len(ids)) % len(refs)]  # [n] reference of each sample
    return EditResult(edit_id=edit_id_of(config), spec=spec, config=config, sample_ids=ids,
                      class_ids=session.class_of(ids), feature_ids=per_row, reference_ids=paired,
                      target_class=target_class, before=before, after=after, delta_ratio=ratio,
                      references=None if paired is None else session.before(paired))


@dataclass(frozen=True)
class EditSummary:
    """What one edit did, by the judge."""

    edit_id: str
    label: str
    changed: float | None  # fraction of samples whose predicted class changed
    hit_rate: float | None  # boosting: became target_class; suppressing: stopped being target_class
    eligible: int  # samples hit_rate is over (not target_class before / target_class before)
    delta_ratio: float


def summarise(r: EditResult) -> EditSummary:
    label = f"{r.spec.op}{' pooled' if r.spec.pooled else ''} {r.spec.strength:g} @ steps {r.spec.window}"
    if r.before.pred is None:
        return EditSummary(r.edit_id, label, None, None, 0, r.delta_ratio)
    changed = float((r.after.pred != r.before.pred).mean())
    hit, eligible = None, 0
    c = r.target_class
    if c is not None and r.spec.op != "style":
        boosting = not suppresses(r.spec.op, r.spec.strength)
        ok = r.before.pred != c if boosting else r.before.pred == c
        eligible = int(ok.sum())
        if eligible:
            hit = float(((r.after.pred == c) if boosting else (r.after.pred != c))[ok].mean())
    return EditSummary(r.edit_id, label, changed, hit, eligible, r.delta_ratio)


# ---------------------------------------------------------------------------------------------------------
# 3. The configured edit grid (asset and CLI) and publishing
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditPlan:
    """A validated `[edit]` request resolved against the warehouse (no model loaded yet)."""

    target: SaeRecord
    specs: list[EditSpec]  # one per (window, strength)
    feature_ids: list[int]
    units: dict[int, float] | None
    maps: dict[int, np.ndarray] | None
    sample_ids: np.ndarray
    reference_ids: np.ndarray | None
    target_class: int | None


def plan_edits(project: Project, wh, store: ActivationStore | None = None) -> EditPlan:
    """Check everything in `[edit]` against the warehouse and the schedule before any sampling."""
    e: EditConfig = project.config.edit
    num_steps = project.config.sampling.num_steps
    store = store if store is not None else open_store(project)
    target = resolve_sae(project, wh, store)
    if e.target_class is not None and not e.feature_ids:
        classes = store.provenance["sampling"]["classes"]
        if e.target_class not in classes:
            raise EditError(f"edit.target_class={e.target_class} is not a class of the run (classes {classes})")
    if e.feature_ids:
        features = list(e.feature_ids)  # checked against the SAE with each spec below
    elif e.op == "style":
        features = []  # all latents
    else:
        features = select_features(wh, target.sae_id, e.target_class, e.n_features, e.min_fire_rate)
    units = feature_units(wh, target.sae_id, features) if e.units == "mean_act" and e.op in UNIT_OPS else None
    maps = feature_maps(wh, target.sae_id, features) if e.spatial and e.op in UNIT_OPS else None
    windows = [StepWindow.parse(w, num_steps) for w in e.windows]
    strengths = [0.0] if e.op == "zero" else list(e.strengths)
    specs = [EditSpec(e.op, tuple(features), s, w, e.branch, pooled=e.pooled) for w in windows for s in strengths]
    for spec in specs:
        spec.check(target.n_latents, num_steps)
    samples, refs = _samples(project, e, target, store)
    return EditPlan(target=target, specs=specs, feature_ids=features, units=units, maps=maps, sample_ids=samples,
                    reference_ids=refs, target_class=None if e.feature_ids else e.target_class)


def _samples(project: Project, e: EditConfig, target: SaeRecord,
             store: ActivationStore) -> tuple[np.ndarray, np.ndarray | None]:
    """edit.sample_ids, or held-out samples: of other classes when boosting target_class, of it when any
    strength suppresses it (``suppresses``)."""
    from tide_core.sampling import class_for

    n_run = store.layout.num_samples
    classes = store.provenance["sampling"]["classes"]
    for name, ids in (("sample_ids", e.sample_ids), ("reference_ids", e.reference_ids)):
        bad = [i for i in ids or [] if not 0 <= i < n_run]
        if bad:
            raise EditError(f"edit.{name} contains {bad}: run {target.run_id} has sample ids 0..{n_run - 1}")
    heldout = split_samples(store, project.config.sae.heldout_fraction).heldout
    if e.sample_ids:
        ids = np.asarray(e.sample_ids, np.int64)
    else:
        pool = heldout
        if e.target_class is not None and not e.feature_ids and e.op != "style" and not e.unconditional:
            suppress = any(suppresses(e.op, s) for s in e.strengths or [0.0])  # zero may list none
            cls = np.array([class_for(int(i), classes) for i in heldout])
            pool = heldout[(cls == e.target_class) if suppress else (cls != e.target_class)]
        ids = pool[:e.n_samples]
        if len(ids) == 0:
            raise EditError(f"no held-out sample fits edit.target_class={e.target_class}: give edit.sample_ids")
    if e.op != "style":
        if e.reference_ids:
            raise EditError(f"edit.reference_ids only apply to op 'style', not {e.op!r}")
        return ids, None
    if e.reference_ids:
        refs = np.asarray(e.reference_ids, np.int64)
        if len(refs) not in (1, len(ids)):
            raise EditError(f"edit.reference_ids has {len(refs)} ids: give one, or one per edited sample ({len(ids)})")
        return ids, refs
    rest = np.setdiff1d(heldout, ids)  # the next held-out samples, one per edited sample
    if len(rest) < len(ids):
        raise EditError("not enough held-out samples left for one style reference per sample: give "
                        "edit.reference_ids")
    return ids, rest[:len(ids)]


@dataclass(frozen=True)
class EditsReport:
    """The configured edits: results, their summaries and where the grid went."""

    plan: EditPlan
    results: list[EditResult]
    summaries: list[EditSummary]
    grid_path: Path
    grid_png: bytes


def run_configured_edits(project: Project, log: Log = print, publish: bool = True) -> EditsReport:
    """The `[edit]` grid: every (window, strength) on the same samples, one grid PNG, rows in `edits`."""
    from storage.warehouse import Warehouse

    wh = Warehouse(project.duckdb_path)
    store = open_store(project)
    plan = plan_edits(project, wh, store)
    e = project.config.edit
    log(f"editing with {plan.target.sae_id}: op {e.op}, features {plan.feature_ids or 'all'}, "
        f"{len(plan.sample_ids)} samples, {len(plan.specs)} settings")
    session = open_session(project, plan.target, cfg_renorm=e.cfg_renorm, unconditional=e.unconditional,
                           store=store)
    results, summaries = [], []
    for spec in plan.specs:
        r = run_edit(session, spec, plan.sample_ids, units=plan.units, maps=plan.maps,
                     reference_ids=plan.reference_ids, target_class=plan.target_class)
        results.append(r)
        summaries.append(summarise(r))
        s = summaries[-1]
        log(f"  {s.edit_id} {s.label}: changed {_pct(s.changed)}, hit rate {_pct(s.hit_rate)} "
            f"(of {s.eligible}), |delta|/|x| {s.delta_ratio:.3f}")
    png = grid_png(results, title=f"{plan.target.sae_id}: {e.op}" +
                   (f" towards class {plan.target_class}" if plan.target_class is not None else ""))
    from pipelines.plots import save_png

    name = f"{plan.target.sae_id}-{e.op}-" + edit_id_of({"ids": [r.edit_id for r in results]})[1:9]
    path = save_png(png, project.root / "edits" / f"{name}.png")
    if publish:
        publish_edits(wh, results, plan.target.run_id)
    return EditsReport(plan=plan, results=results, summaries=summaries, grid_path=path, grid_png=png)


def publish_edits(wh, results: Sequence[EditResult], run_id: str) -> None:
    """Replace each edit's rows (partition = edit_id; replace_partition creates the schema if needed)."""
    for r in results:
        wh.replace_partition("edits", {"edit_id": r.edit_id}, r.rows(run_id))


def grid_png(results: Sequence[EditResult], title: str = "") -> bytes:
    """Rows = samples; columns = before, then one per edit (same seeds), titled with op, strength, steps and
    the judge's prediction under each image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.plots import png_bytes_of_figure

    first = results[0]
    n = len(first.sample_ids)
    cols = [("before", first.before)] + [(f"{r.spec.op} {r.spec.strength:g}\nsteps {r.spec.window}", r.after)
                                         for r in results]
    if first.references is not None:
        cols.insert(0, ("reference", first.references))
    fig, axes = plt.subplots(n, len(cols), figsize=(1.05 * len(cols), 1.15 * n + 0.6), squeeze=False)
    for j, (name, judged) in enumerate(cols):
        axes[0, j].set_title(name, fontsize=6)
        for i in range(n):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(judged.images[i][..., 0], cmap="gray", vmin=0, vmax=255)
            if judged.pred is not None:
                ax.set_xlabel(f"{int(judged.pred[i])} ({judged.conf[i]:.2f})", fontsize=6)
    for i in range(n):
        axes[i, 0].set_ylabel(f"#{int(first.sample_ids[i])} c{int(first.class_ids[i])}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=7)
    return png_bytes_of_figure(fig)


def summary_markdown(summaries: Sequence[EditSummary]) -> str:
    lines = ["| edit_id | edit | changed | hit rate (of n) | dz/x |", "|---|---|---|---|---|"]
    lines += [f"| {s.edit_id} | {s.label} | {_pct(s.changed)} | {_pct(s.hit_rate)} ({s.eligible}) | "
              f"{s.delta_ratio:.3f} |" for s in summaries]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"
