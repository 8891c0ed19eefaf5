"""Feature-guided editing behind `tide edit` and the `edits` asset.

``EditSession``: the DiT, run sampler, judge and SAE, loaded once; it samples the same seeds without the edit
(cached, shared by every edit of a sweep) and with it, and judges both. Results go to one `edits` row per
(edit, sample), each image before and after as a PNG under <warehouse>/edits/<edit_id>/ (the rows say
where), and a before/after grid PNG under <warehouse>/edits/. Every check that can fail runs in
``plan_edits`` (pipelines.stages.edit_plan), before the DiT is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dashboards.png import encode_png
from pipelines.context import RunContext
from pipelines.plots import png_bytes_of_figure, pyplot, save_png
from pipelines.project import content_key
from pipelines.stages.edit_plan import ConceptPick, EditPlan, plan_edits, suppresses
from pipelines.stages.sae import split_samples
from storage import SaeRecord, Warehouse
from tide_core.edit import EditError, EditHook, EditSpec, StepRecord, check_sae_fits
from tide_core.models.base import Judge
from tide_core.sae import SparseAutoencoder
from tide_core.sampling import Sampler, condition_for, from_uint8, to_uint8


@dataclass(frozen=True)
class Judged:
    """Images with the judge's verdict (pred / conf are None without a judge)."""

    images: np.ndarray  # uint8 [n, H, W, C]
    pred: np.ndarray | None  # int64 [n]
    conf: np.ndarray | None  # float32 [n]
    factors: np.ndarray | None = None  # int64 [n, F]: every factor the judge scores (Judgement.factor_pred)

    def take(self, index) -> Judged:
        """These images' rows at ``index`` (an int slice or an index array), verdicts and all."""
        return Judged(*(None if a is None else a[index] for a in (self.images, self.pred, self.conf, self.factors)))

    @staticmethod
    def concat(parts: Sequence[Judged]) -> Judged:
        """Parts (all judged, or none) one after another."""
        cols = zip(*((j.images, j.pred, j.conf, j.factors) for j in parts), strict=True)
        return Judged(*(None if c[0] is None else np.concatenate(c) for c in cols))


@dataclass
class EditSession:
    """Everything an edit needs, loaded once per SAE; ``before`` caches the unedited images by sample id."""

    target: SaeRecord
    sae: SparseAutoencoder
    sampler: Sampler  # its cfg_renorm (None = off) applies to before and after images alike
    judge: Judge | None
    run_classes: list[int]
    heldout: np.ndarray  # int64 sample ids never used to train the SAE
    null_class: int | None = None  # set: sample unconditionally (this condition, no guidance)
    _before: dict[int, Judged] = field(default_factory=dict)  # sample id -> its unedited image, judged

    @property
    def num_steps(self) -> int:
        return self.sampler.num_steps

    def class_of(self, sample_ids: Sequence[int]) -> np.ndarray:
        """The condition each sample is sampled with: its class in the run, or the null condition."""
        if self.null_class is not None:
            return np.full(len(sample_ids), self.null_class, np.int64)
        return np.array([condition_for(int(i), self.run_classes) for i in sample_ids], np.int64)

    def judge_images(self, images_u8: np.ndarray) -> Judged:
        if self.judge is None:
            return Judged(images_u8, None, None)
        v = self.judge.judge(from_uint8(images_u8))
        return Judged(images_u8, v.pred, v.confidence, v.factor_pred)

    def sample(self, sample_ids: Sequence[int], observer=None, batch_size: int = 64) -> np.ndarray:
        """uint8 [n, H, W, C] images of the run's sample ids (their seeds and classes)."""
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
                self._before[sid] = got.take(slice(j, j + 1))
        return Judged.concat([self._before[int(i)] for i in sample_ids])


def open_session(ctx: RunContext, target: SaeRecord, cfg_renorm: float | None = None,
                 unconditional: bool = False) -> EditSession:
    """unconditional: sample with the null condition and no guidance, so the image is decided by the noise
    and the features rather than by a label every block is conditioned on. cfg_renorm: the sampler's."""
    store = ctx.store()
    sampler = ctx.sampler(cfg_renorm=cfg_renorm)
    if unconditional:
        sampler.guidance_scale = 1.0  # guidance needs a label to guide towards
    sae = SparseAutoencoder.load(target.path, device=sampler.model.device)
    check_sae_fits(sampler.model, target.layer, sae)
    split = split_samples(store, ctx.config.sae.heldout_fraction)
    return EditSession(target=target, sae=sae, sampler=sampler, judge=ctx.judge,
                       run_classes=list(store.provenance["sampling"]["classes"]), heldout=split.heldout,
                       null_class=sampler.model.null_condition if unconditional else None)


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
    target_class: int | None  # the condition whose features were picked (a class, or a prompt's index)
    before: Judged
    after: Judged
    references: Judged | None  # style: the reference of each sample, unedited
    delta_ratio: float  # mean |dec(z') - dec(z)| / |x| over edited steps and tokens
    target_judged: int | None = None  # the judge's class that target_class asks for (-1: it names none)
    concept: ConceptPick | None = None  # set: the latents were picked for this concept

    def rows(self, run_id: str, image_dir: str | None = None) -> list[dict]:
        """``edits`` rows; image_dir: where ``write_edit_images`` put the images, relative to the warehouse
        root (None: not written, the rows name none)."""
        cfg = json.dumps(self.config, sort_keys=True)
        judged = self.before.pred is not None
        shown = [None, None] if self.concept is None else [self.concept.shown(j.factors)
                                                           for j in (self.before, self.after)]
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
                "image_before": None if image_dir is None else f"{image_dir}/{int(sid)}-before.png",
                "image_after": None if image_dir is None else f"{image_dir}/{int(sid)}-after.png",
                "concept": None if self.concept is None else self.concept.name,
                "concept_before": None if shown[0] is None else bool(shown[0][i]),
                "concept_after": None if shown[1] is None else bool(shown[1][i]),
            })
        return out


def edit_id_of(config: dict) -> str:
    """Same config (SAE, op, features, strength, window, samples, sampler) -> same id, so reruns replace."""
    return "e" + content_key(config, 15)


def run_edit(session: EditSession, spec: EditSpec, sample_ids: Sequence[int], *,
             row_features: Sequence[Sequence[int]] | None = None, units: dict[int, float] | None = None,
             maps: dict[int, np.ndarray] | None = None, reference_ids: Sequence[int] | None = None,
             target_class: int | None = None, target_judged: int | None = None,
             concept: ConceptPick | None = None) -> EditResult:
    """Sample ``sample_ids`` with the edit (references, for style, appended to the batch) and judge it
    against the cached unedited images of the same seeds. target_judged: the judge's class target_class
    asks for (``Judge.asked_classes``), when that is not target_class itself (a text run's prompt)."""
    ids = np.asarray(sample_ids, np.int64)
    refs = None if reference_ids is None else np.asarray(reference_ids, np.int64)
    if refs is not None and len(refs) not in (1, len(ids)):
        raise EditError(f"give one reference for all samples or one per sample: {len(refs)} references for "
                        f"{len(ids)} samples")
    per_row = [list(f) for f in row_features] if row_features is not None else [list(spec.feature_ids)] * len(ids)
    hook = EditHook(session.sampler.model, session.target.layer, session.sae, spec, session.num_steps,
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
    if concept is not None:  # only then: the ids of edits picked otherwise stay what they were
        config["concept"] = f"{concept.kind}:{concept.name}"
    ratio = StepRecord.mean_ratio(hook.records)
    paired = None if refs is None else refs[np.arange(len(ids)) % len(refs)]  # [n] reference of each sample
    return EditResult(edit_id=edit_id_of(config), spec=spec, config=config, sample_ids=ids,
                      class_ids=session.class_of(ids), feature_ids=per_row, reference_ids=paired,
                      target_class=target_class, target_judged=target_judged, concept=concept,
                      before=before, after=after, delta_ratio=ratio,
                      references=None if paired is None else session.before(paired))


@dataclass(frozen=True)
class EditSummary:
    """What one edit did, by the judge."""

    edit_id: str
    label: str
    changed: float | None  # fraction of samples whose predicted class changed
    hit_rate: float | None  # boosting: became target_class (shows the concept); suppressing: stopped
    eligible: int  # samples hit_rate is over (not target_class before / target_class before)
    delta_ratio: float


def summarise(r: EditResult) -> EditSummary:
    label = f"{r.spec.op}{' pooled' if r.spec.pooled else ''} {r.spec.strength:g} @ steps {r.spec.window}"
    if r.before.pred is None:
        return EditSummary(r.edit_id, label, None, None, 0, r.delta_ratio)
    changed = float((r.after.pred != r.before.pred).mean())
    # the judge's class, not the condition: in a text run condition 4 is a prompt, which may ask for a seven
    c = r.target_class if r.target_judged is None else r.target_judged
    if r.concept is not None:
        before, after = r.concept.shown(r.before.factors), r.concept.shown(r.after.factors)  # bool [n] or None
    elif c is not None and c >= 0:
        before, after = r.before.pred == c, r.after.pred == c
    else:
        before = after = None
    hit, eligible = None, 0
    if before is not None and r.spec.op != "style":
        boosting = not suppresses(r.spec.op, r.spec.strength)
        ok = ~before if boosting else before
        eligible = int(ok.sum())
        if eligible:
            hit = float((after if boosting else ~after)[ok].mean())
    return EditSummary(r.edit_id, label, changed, hit, eligible, r.delta_ratio)


@dataclass(frozen=True)
class EditsReport:
    """The configured edits: results, their summaries and where the grid went."""

    plan: EditPlan
    results: list[EditResult]
    summaries: list[EditSummary]
    grid_path: Path
    grid_png: bytes


def run_configured_edits(ctx: RunContext, publish: bool = True) -> EditsReport:
    """The `[edit]` grid: every (window, strength) on the same samples, one grid PNG, rows in `edits`."""
    plan = plan_edits(ctx)
    e = ctx.config.edit
    ctx.log(f"editing with {plan.target.sae_id}: op {e.op}, features {plan.feature_ids or 'all'}, "
            f"{len(plan.sample_ids)} samples, {len(plan.specs)} settings")
    session = open_session(ctx, plan.target, cfg_renorm=e.cfg_renorm, unconditional=e.unconditional)
    judged = None
    if plan.target_class is not None and ctx.family.judge_class is not None:
        judged = int(ctx.family.judge_class.asked_classes(list(session.sampler.model.condition_names))[
            plan.target_class])
    results, summaries = [], []
    for spec in plan.specs:
        r = run_edit(session, spec, plan.sample_ids, units=plan.units, maps=plan.maps,
                     reference_ids=plan.reference_ids, target_class=plan.target_class, target_judged=judged,
                     concept=plan.concept)
        results.append(r)
        summaries.append(summarise(r))
        s = summaries[-1]
        ctx.log(f"  {s.edit_id} {s.label}: changed {_pct(s.changed)}, hit rate {_pct(s.hit_rate)} "
                f"(of {s.eligible}), |delta|/|x| {s.delta_ratio:.3f}")
    towards = (f" towards {plan.concept.kind} {plan.concept.name}" if plan.concept is not None else
               f" towards class {plan.target_class}" if plan.target_class is not None else "")
    png = grid_png(results, title=f"{plan.target.sae_id}: {e.op}{towards}")
    name = f"{plan.target.sae_id}-{e.op}-" + edit_id_of({"ids": [r.edit_id for r in results]})[1:9]
    path = save_png(png, ctx.project.edits_dir / f"{name}.png")
    if publish:
        image_dirs = {r.edit_id: write_edit_images(ctx.project.root, ctx.project.edits_dir, r) for r in results}
        publish_edits(ctx.warehouse, results, plan.target.run_id, image_dirs)
    return EditsReport(plan=plan, results=results, summaries=summaries, grid_path=path, grid_png=png)


def write_edit_images(root: Path, edits_dir: Path, r: EditResult) -> str:
    """Each sample's image before and after the edit, <edits_dir>/<edit_id>/<sample_id>-{before,after}.png;
    returns that folder relative to the warehouse root, as the rows record it (an edit id names its config,
    so a rerun rewrites the same files)."""
    folder = edits_dir / r.edit_id
    for i, sid in enumerate(r.sample_ids):
        for name, judged in (("before", r.before), ("after", r.after)):
            save_png(encode_png(judged.images[i]), folder / f"{int(sid)}-{name}.png")
    return folder.relative_to(root).as_posix()


def publish_edits(wh: Warehouse, results: Sequence[EditResult], run_id: str,
                  image_dirs: dict[str, str] | None = None) -> None:
    """Replace each edit's rows (partition = edit_id), all in one transaction; ``image_dirs``: edit_id ->
    where ``write_edit_images`` put its images (written first, so no row names a file not there yet)."""
    with wh.transaction() as tx:
        for r in results:
            tx.replace_partition("edits", {"edit_id": r.edit_id}, r.rows(run_id, (image_dirs or {}).get(r.edit_id)))


def grid_png(results: Sequence[EditResult], title: str = "") -> bytes:
    """Rows = samples; columns = before, then one per edit (same seeds), titled with op, strength, steps and
    the judge's prediction under each image."""
    plt = pyplot()
    first = results[0]
    n = len(first.sample_ids)
    cols = [("before", first.before)] + [(f"{r.spec.op} {r.spec.strength:g}\nsteps {r.spec.window}", r.after)
                                         for r in results]
    if first.references is not None:
        cols.insert(0, ("reference", first.references))
    height = 1.15 * n + 0.6  # inches
    fig, axes = plt.subplots(n, len(cols), figsize=(1.05 * len(cols), height), squeeze=False)
    fig.subplots_adjust(top=1 - 0.75 / height)  # room for the title and column titles, whatever the row count
    for j, (name, judged) in enumerate(cols):
        axes[0, j].set_title(name, fontsize=6)
        for i in range(n):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            img = judged.images[i]  # uint8 [H, W, C]: grey digits, RGB styled digits and decoded latents
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            if judged.pred is not None:
                ax.set_xlabel(f"{int(judged.pred[i])} ({judged.conf[i]:.2f})", fontsize=6)
    for i in range(n):
        axes[i, 0].set_ylabel(f"#{int(first.sample_ids[i])} c{int(first.class_ids[i])}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=7, y=1 - 0.1 / height)
    return png_bytes_of_figure(fig)


def summary_markdown(summaries: Sequence[EditSummary]) -> str:
    lines = ["| edit_id | edit | changed | hit rate (of n) | dz/x |", "|---|---|---|---|---|"]
    lines += [f"| {s.edit_id} | {s.label} | {_pct(s.changed)} | {_pct(s.hit_rate)} ({s.eligible}) | "
              f"{s.delta_ratio:.3f} |" for s in summaries]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"
