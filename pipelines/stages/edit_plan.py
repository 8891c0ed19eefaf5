"""What to edit: the `[edit]` request (config or `tide edit`) resolved against the warehouse before any model
is loaded: the SAE (checked against the configured model), the features most selective for a class
(`v_features`) or most associated with a concept (`feature_concepts`), their units (mean activation) and
spatial maps, the samples and style references."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.context import RunContext
from pipelines.project import Project
from pipelines.stages.sae import missing_checkpoint, split_samples
from storage import ActivationStore, SaeRecord, UnknownSaeError, Warehouse
from tide_core.config import EditConfig, parse_config
from tide_core.edit import EditError, EditSpec, StepWindow
from tide_core.factors import ConditionFactors
from tide_core.features.concepts import Concepts, run_concepts, run_factors
from tide_core.sampling import condition_for

UNIT_OPS = ("add", "clamp")  # ops whose strength is in units of each feature (units, spatial maps)
EDIT_SITE = "resid"  # the edit hook changes the block output


def suppresses(op: str, strength: float) -> bool:
    """Whether an edit pushes its features down (towards "not target_class") rather than up: zero, scale
    < 1, add < 0, clamp <= 0. Style moves towards a reference and neither boosts nor suppresses a class."""
    return (op == "zero" or (op == "scale" and strength < 1) or (op == "add" and strength < 0)
            or (op == "clamp" and strength <= 0))


def with_edit(project: Project, **overrides) -> Project:
    """The project with `[edit]` fields replaced (e.g. from the CLI), validated like the config file."""
    data = project.config.model_dump(mode="json")
    data["edit"] = {**data["edit"], **{k: v for k, v in overrides.items() if v is not None}}
    if overrides.get("target_class") is not None and overrides.get("concept") is None:
        data["edit"]["concept"] = None  # a class asked for now replaces the config's concept
    return dataclasses.replace(project, config=parse_config(data, origin="tide edit arguments"))


def resolve_sae(ctx: RunContext) -> SaeRecord:
    """edit.sae_id, or the SAE of edit.layer / edit.variant trained on the current store's run (the `saes`
    row; its sample ids are the run's), with its checkpoint on disk."""
    e = ctx.config.edit
    wh, store = ctx.warehouse, ctx.store()
    run_id = store.provenance["run_id"]
    if e.sae_id is not None:
        try:
            rec = wh.require_sae(e.sae_id)
        except UnknownSaeError as err:
            raise EditError(str(err)) from None
    else:
        layers = sorted(ctx.config.capture.layers)
        layer = e.layer if e.layer is not None else layers[len(layers) // 2]
        variant = e.variant or ctx.config.sae.variants[0]
        ids = wh.query("SELECT sae_id FROM saes WHERE run_id = ? AND layer = ? AND variant = ? AND site = ? "
                       "ORDER BY created_at DESC LIMIT 1", [run_id, layer, variant, EDIT_SITE]).column(0).to_pylist()
        if not ids:
            raise EditError(f"no {variant} SAE of layer {layer} for run {run_id} in the warehouse: "
                            "materialize the `sae` asset for that layer (or pass --sae)")
        rec = wh.require_sae(ids[0])
    if rec.site != EDIT_SITE:
        raise EditError(f"SAE {rec.sae_id} was trained on the {rec.site!r} site; editing changes the block "
                        f"output: pick a {EDIT_SITE!r} SAE")
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


def select_features(wh: Warehouse, sae_id: str, class_id: int, n: int, min_fire_rate: float = 0.0) -> list[int]:
    """The n latents most selective for class_id (top_class = class_id, highest class_selectivity first),
    ignoring those firing on fewer than min_fire_rate of tokens."""
    return _picked(wh, sae_id, "features", "SELECT feature_id FROM v_features WHERE sae_id = ? AND top_class = ? "
                   "AND fire_rate >= ? AND class_selectivity IS NOT NULL ORDER BY class_selectivity DESC, "
                   "fire_rate DESC, feature_id LIMIT ?", [sae_id, class_id, min_fire_rate, n],
                   f"no feature of SAE {sae_id} has top_class {class_id} and fire_rate >= {min_fire_rate}: "
                   "lower edit.min_fire_rate (--min-fire-rate) or check the class id")


def _picked(wh: Warehouse, sae_id: str, table: str, sql: str, params: list, none_match: str) -> list[int]:
    """The feature ids ``sql`` picks from the statistics in ``table``; when none, an error that says
    whether the statistics are missing or nothing matched (``none_match``)."""
    rows = wh.query(sql, params).column(0).to_pylist()
    if rows:
        return [int(f) for f in rows]
    if not wh.query(f"SELECT count(*) FROM {table} WHERE sae_id = ?", [sae_id]).column(0)[0].as_py():
        raise EditError(f"the `{table}` table has no rows for SAE {sae_id}: materialize the feature statistics "
                        "first, or name the features (--features / edit.feature_ids)")
    raise EditError(none_match)


@dataclass(frozen=True)
class ConceptPick:
    """A concept an edit's latents were picked for, and how the judge scores it."""

    name: str  # as in feature_concepts.concept ("red", "seven", a prompt word)
    kind: str  # class, word, tag, or a factor (colour, thickness, background)
    conditions: np.ndarray  # bool [C]: the run's conditions that carry it
    factor: int | None = None  # column of the judge's factor verdicts that scores it (None: the judge cannot)
    value: int | None = None  # its value code in that column

    def shown(self, factor_pred: np.ndarray | None) -> np.ndarray | None:
        """bool [n]: the judge sees the concept (factor_pred: int64 [n, F]); None if it cannot tell."""
        if factor_pred is None or self.factor is None:
            return None
        return factor_pred[:, self.factor] == self.value


def pick_concept(concept: str, concepts: Concepts, asked: ConditionFactors | None) -> ConceptPick:
    """``concept`` ("red", or "colour:red" where one name has several kinds) among the run's concepts,
    with the judge's column for it: a factor value of a factor-judged run, or a class of a class run."""
    kind, _, name = concept.rpartition(":")
    hits = [k for k, (n, kd) in enumerate(zip(concepts.names, concepts.kinds, strict=True))
            if n == name and kind in ("", kd)]
    if not hits:
        known = sorted({f"{kd}:{n}" for n, kd in zip(concepts.names, concepts.kinds, strict=True)})
        raise EditError(f"edit.concept={concept!r} is not a concept of this run; its concepts are "
                        f"{', '.join(known[:40])}{' ...' if len(known) > 40 else ''}")
    if len(hits) > 1:
        kinds = ", ".join(f"{concepts.kinds[k]}:{name}" for k in hits)
        raise EditError(f"edit.concept={concept!r} names concepts of several kinds: write one of {kinds}")
    k = hits[0]
    kind = concepts.kinds[k]
    factor = value = None
    if asked is not None and kind in asked.names:  # a factor value ("colour=red" where two factors share it)
        factor = asked.names.index(kind)
        value = asked.values[factor].index(name.rpartition("=")[2])
    elif asked is None and kind == "class":  # a class run: the judge's class codes are the run's class ids
        factor, value = 0, k
    return ConceptPick(name, kind, concepts.incidence[:, k], factor, value)


def select_concept_features(wh: Warehouse, sae_id: str, pick: ConceptPick, n: int,
                            min_fire_rate: float = 0.0) -> list[int]:
    """The n latents with the highest lift for the concept (``feature_concepts``: fire rate on the images
    that carry it over the rate on all images), among those firing on at least min_fire_rate of its
    images' tokens and more often with it than without (lift > 1)."""
    return _picked(wh, sae_id, "feature_concepts", "SELECT feature_id FROM feature_concepts WHERE sae_id = ? "
                   "AND concept = ? AND kind = ? AND fire_rate >= ? AND lift > 1 ORDER BY lift DESC, fire_rate DESC, "
                   "feature_id LIMIT ?", [sae_id, pick.name, pick.kind, min_fire_rate, n],
                   f"no latent of SAE {sae_id} fires more often with {pick.kind}:{pick.name} than without on at "
                   f"least {min_fire_rate} of its tokens: lower edit.min_fire_rate (--min-fire-rate)")


def feature_units(wh: Warehouse, sae_id: str, feature_ids: Sequence[int]) -> dict[int, float]:
    """Each feature's mean activation when it fires (the unit of add / clamp strengths, units=mean_act)."""
    rows = wh.query("SELECT feature_id, mean_act FROM features WHERE sae_id = ? AND list_contains(?, feature_id)",
                    [sae_id, [int(f) for f in feature_ids]]).to_pylist()
    units = {int(r["feature_id"]): r["mean_act"] for r in rows}
    missing = [int(f) for f in feature_ids if not units.get(int(f))]
    if missing:
        raise EditError(f"features {missing[:10]} of SAE {sae_id} have no mean activation in the `features` "
                        "table (never fired, or statistics not computed): use units='absolute' (--units absolute)")
    return units


def feature_maps(wh: Warehouse, sae_id: str, feature_ids: Sequence[int]) -> dict[int, np.ndarray]:
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
    concept: ConceptPick | None = None  # set: the latents were picked for this concept (edit.concept)


def plan_edits(ctx: RunContext) -> EditPlan:
    """Check everything in `[edit]` against the warehouse and the schedule before any sampling."""
    e: EditConfig = ctx.config.edit
    num_steps = ctx.config.sampling.num_steps
    wh, store = ctx.warehouse, ctx.store()
    target = resolve_sae(ctx)
    if e.target_class is not None and not e.feature_ids and e.concept is None:
        classes = store.provenance["sampling"]["classes"]
        if e.target_class not in classes:
            raise EditError(f"edit.target_class={e.target_class} is not a class of the run (classes {classes})")
    concept = None
    if e.feature_ids:
        features = list(e.feature_ids)  # checked against the SAE with each spec below
    elif e.op == "style":
        features = []  # all latents
    elif e.concept is not None:
        asked = run_factors(store.provenance, ctx.family.judge_class)
        concept = pick_concept(e.concept, run_concepts(store.provenance, asked), asked)
        features = select_concept_features(wh, target.sae_id, concept, e.n_features, e.min_fire_rate)
    else:
        features = select_features(wh, target.sae_id, e.target_class, e.n_features, e.min_fire_rate)
    units = feature_units(wh, target.sae_id, features) if e.units == "mean_act" and e.op in UNIT_OPS else None
    maps = feature_maps(wh, target.sae_id, features) if e.spatial and e.op in UNIT_OPS else None
    windows = [StepWindow.parse(w, num_steps) for w in e.windows]
    strengths = [0.0] if e.op == "zero" else list(e.strengths)
    specs = [EditSpec(e.op, tuple(features), s, w, e.branch, pooled=e.pooled) for w in windows for s in strengths]
    for spec in specs:
        spec.check(target.n_latents, num_steps)
    samples, refs = _samples(ctx, e, target, store, concept)
    by_class = not e.feature_ids and concept is None
    return EditPlan(target=target, specs=specs, feature_ids=features, units=units, maps=maps, sample_ids=samples,
                    reference_ids=refs, target_class=e.target_class if by_class else None, concept=concept)


def _samples(ctx: RunContext, e: EditConfig, target: SaeRecord, store: ActivationStore,
             concept: ConceptPick | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """edit.sample_ids, or held-out samples: of other classes when boosting target_class (of conditions
    without the concept), of it (with it) when any strength suppresses it (``suppresses``)."""
    n_run = store.layout.num_samples
    classes = store.provenance["sampling"]["classes"]
    for name, ids in (("sample_ids", e.sample_ids), ("reference_ids", e.reference_ids)):
        bad = [i for i in ids or [] if not 0 <= i < n_run]
        if bad:
            raise EditError(f"edit.{name} contains {bad}: run {target.run_id} has sample ids 0..{n_run - 1}")
    heldout = split_samples(store, ctx.config.sae.heldout_fraction).heldout
    if e.sample_ids:
        ids = np.asarray(e.sample_ids, np.int64)
    else:
        pool = heldout
        by_class = e.target_class is not None and concept is None
        if (by_class or concept is not None) and not e.feature_ids and e.op != "style" and not e.unconditional:
            suppress = any(suppresses(e.op, s) for s in e.strengths or [0.0])  # zero may list none
            cls = np.array([condition_for(int(i), classes) for i in heldout])
            has = cls == e.target_class if by_class else concept.conditions[cls]  # [n] carries the target
            pool = heldout[has if suppress else ~has]
        ids = pool[:e.n_samples]
        if len(ids) == 0:
            asked = f"edit.concept={e.concept}" if concept is not None else f"edit.target_class={e.target_class}"
            raise EditError(f"no held-out sample fits {asked}: give edit.sample_ids")
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
