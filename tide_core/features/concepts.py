"""Concepts: what a feature is associated with, so class- and text-conditional runs share one table.

A run's conditions (classes, or prompts) each carry concepts: a class carries its name; a prompt carries its
words and tags (``tide_core.prompts``). A feature's statistics per concept pool the per-condition counts of
the feature pass over the conditions that carry the concept: fire rate = its firing tokens on those images /
their tokens; lift = that rate / its rate over every image. A word that is also a tag is one concept (of
kind tag) carried by the prompts that have either. A family whose judge knows generative factors (the
styled digits) has factor values as concepts instead, of kind the factor ("red" of kind colour), carried by
the prompts that ask for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tide_core.factors import ConditionFactors
from tide_core.features.factor_association import scored_factors
from tide_core.features.summary import FeatureSummary
from tide_core.prompts import Prompt


@dataclass(frozen=True)
class Concepts:
    """The concepts of a run and which conditions carry each."""

    names: list[str]  # [K]
    kinds: list[str]  # [K] class, word or tag
    incidence: np.ndarray  # bool [C, K]: condition c carries concept k


def class_concepts(class_names: list[str]) -> Concepts:
    """One concept per class, carried by that class alone."""
    k = len(class_names)
    return Concepts(list(class_names), ["class"] * k, np.eye(k, dtype=bool))


def factor_concepts(asked: ConditionFactors) -> Concepts:
    """One concept per factor value some condition asks for, of kind the factor's name ("red" of kind
    colour), carried by the conditions that ask for it. A value that two factors share is named
    "factor=value"."""
    names, kinds, cols = [], [], []
    counts: dict[str, int] = {}
    for values in asked.values:
        for v in values:
            counts[v] = counts.get(v, 0) + 1
    for j, (factor, values) in enumerate(zip(asked.names, asked.values, strict=True)):
        for i, v in enumerate(values):
            carried = asked.codes[:, j] == i  # [C]
            if carried.any():
                names.append(v if counts[v] == 1 else f"{factor}={v}")
                kinds.append(factor)
                cols.append(carried)
    incidence = np.stack(cols, axis=1) if cols else np.zeros((len(asked.codes), 0), bool)  # [C, K]
    return Concepts(names, kinds, incidence)


def prompt_concepts(prompts: list[Prompt]) -> Concepts:
    """The words and tags of the prompts (tags first where a word is also a tag)."""
    kind: dict[str, str] = {}
    for p in prompts:
        for t in p.tags:
            kind[t] = "tag"
        for w in p.words():
            kind.setdefault(w, "word")
    names = sorted(kind)
    col = {c: j for j, c in enumerate(names)}
    incidence = np.zeros((len(prompts), len(names)), dtype=bool)
    for i, p in enumerate(prompts):
        for c in (*p.tags, *p.words()):
            incidence[i, col[c]] = True
    return Concepts(names, [kind[c] for c in names], incidence)


@dataclass(frozen=True)
class ConceptRows:
    """feature_concepts rows of one SAE, as columns."""

    feature_id: np.ndarray  # int64 [R]
    concept: list[str]  # [R]
    kind: list[str]  # [R]
    images: np.ndarray  # int64 [R]
    fire_rate: np.ndarray  # float64 [R]
    mean_act: np.ndarray  # float64 [R]
    lift: np.ndarray  # float64 [R]


def concept_rows(summary: FeatureSummary, concepts: Concepts, images_per_condition: np.ndarray,
                 per_feature: int) -> ConceptRows:
    """Each feature's statistics per concept, pooled over the steps: the rows where it fired, at most
    ``per_feature`` of them per feature (the highest lift first, then the higher fire rate)."""
    m = concepts.incidence.astype(np.float64)  # [C, K]
    fires = summary.fires.sum(0).astype(np.float64)  # [C, n]
    act = summary.act_sum.sum(0)  # [C, n]
    tokens = summary.class_tokens.sum(0).astype(np.float64)  # [C]
    k_fires = m.T @ fires  # [K, n]
    k_act = m.T @ act  # [K, n]
    k_tokens = m.T @ tokens  # [K]
    k_images = (m.T @ images_per_condition.astype(np.float64)).round().astype(np.int64)  # [K]
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = k_fires / np.maximum(k_tokens, 1)[:, None]  # [K, n]
        lift = rate / summary.fire_rate()[None, :]  # [K, n]
        mean = k_act / k_fires  # [K, n]
    keep = k_fires > 0
    if keep.sum(0).max(initial=0) > per_feature:  # rank each feature's concepts, keep its best per_feature
        order = np.lexsort((-np.nan_to_num(rate), -np.nan_to_num(lift)), axis=0)  # [K, n] best first
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(order.shape[0])[:, None], axis=0)
        keep &= rank < per_feature
    ff, kk = np.nonzero(keep.T)  # [R] each: feature-major, features ascending, concepts in name order
    return ConceptRows(feature_id=ff.astype(np.int64), concept=[concepts.names[k] for k in kk],
                       kind=[concepts.kinds[k] for k in kk], images=k_images[kk], fire_rate=rate[kk, ff],
                       mean_act=mean[kk, ff], lift=lift[kk, ff])


def run_factors(provenance: dict, judge_class=None) -> ConditionFactors | None:
    """What a prompted run's conditions ask of each factor its family's judge scores (None: a class run,
    or no judge); only the factors some prompt names."""
    prompts = provenance.get("prompts")
    if not prompts or judge_class is None:
        return None
    asked = scored_factors(judge_class.condition_factors([p["text"] for p in prompts]))
    return asked if asked.names else None


def run_concepts(provenance: dict, asked: ConditionFactors | None = None) -> Concepts:
    """The concepts of a run's conditions: the factor values its prompts ask for (``run_factors``, for a family
    whose judge knows factors), else its prompts' words and tags, or its class names."""
    if asked is not None:
        return factor_concepts(asked)
    prompts = provenance.get("prompts")
    if prompts:
        return prompt_concepts([Prompt(p["text"], tuple(p["tags"])) for p in prompts])
    return class_concepts([str(c) for c in provenance["class_names"]])
