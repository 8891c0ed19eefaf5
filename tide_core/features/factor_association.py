"""How much each latent's firing tells about each generative factor, step by step.

For one factor (its values v), one step and one latent, over the tokens of the images whose condition asks
for a value of the factor: a token's value is its image's, and the latent fires on it or not. The mutual
information between the two, in bits, is H(fires) - sum_v p(v) H(fires | v), with p(v) the share of the
factor's tokens that have value v; divided by the factor's entropy H(v) it is the share of what there is to
know about the factor that this one latent's firing carries (0: independent; 1 would need a latent that
fires on exactly one value's tokens, all of them, and a factor of two values). The value on whose tokens the
latent fires most often is its best value; lift is that rate over the latent's rate on the factor's tokens.

Everything comes from the feature pass's per-(step, condition) counts, so it costs no second pass; the
pooled row (step = ``overall_step``) sums the steps' counts first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tide_core.factors import UNASKED, ConditionFactors
from tide_core.features.summary import FeatureSummary


@dataclass(frozen=True)
class FactorAssociation:
    """feature_factors rows of one SAE, as columns: one per (latent, factor, step) where the latent fired on
    the factor's tokens at that step."""

    feature_id: np.ndarray  # int64 [R]
    factor: list[str]  # [R]
    step: np.ndarray  # int64 [R]
    best_value: list[str]  # [R]
    mutual_info: np.ndarray  # float64 [R] bits
    normalized_mi: np.ndarray  # float64 [R] mutual_info / H(factor) at that step
    best_rate: np.ndarray  # float64 [R] fire rate on the best value's tokens
    lift: np.ndarray  # float64 [R] best_rate / fire rate on all the factor's tokens


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    """Binary entropy of probabilities p (any shape), 0 at p in {0, 1}."""
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(h, nan=0.0)


def factor_association(summary: FeatureSummary, asked: ConditionFactors, overall_step: int) -> FactorAssociation:
    """Every latent's association with every factor at every step of ``summary`` and pooled."""
    fires = summary.fires.astype(np.float64)  # [S, C, n]
    tokens = summary.class_tokens.astype(np.float64)  # [S, C]
    fires = np.concatenate([fires, fires.sum(0, keepdims=True)])  # [S+1, C, n]
    tokens = np.concatenate([tokens, tokens.sum(0, keepdims=True)])  # [S+1, C]
    steps = np.append(summary.steps, overall_step)  # [S+1]
    cols: dict[str, list] = {k: [] for k in FactorAssociation.__dataclass_fields__}
    for j, factor in enumerate(asked.names):
        values = asked.values[j]
        codes = asked.codes[:, j]  # [C]
        onehot = (codes[:, None] == np.arange(len(values))[None, :]).astype(np.float64)  # [C, V]; UNASKED: 0
        tv = tokens @ onehot  # [S+1, V] tokens of each value
        fv = np.einsum("scn,cv->svn", fires, onehot)  # [S+1, V, n] firings on each value's tokens
        total = tv.sum(1)  # [S+1]
        fired = fv.sum(1)  # [S+1, n]
        with np.errstate(divide="ignore", invalid="ignore"):
            pv = tv / total[:, None]  # [S+1, V]
            rate = fv / tv[:, :, None]  # [S+1, V, n]; NaN for a value without tokens
            p_fire = fired / total[:, None]  # [S+1, n]
        pv = np.nan_to_num(pv)
        cond = (pv[:, :, None] * _entropy_bits(np.nan_to_num(rate))).sum(1)  # [S+1, n] H(fires | v)
        mi = np.clip(_entropy_bits(p_fire) - cond, 0.0, None)  # [S+1, n]; clip: round-off below 0
        with np.errstate(divide="ignore"):
            h_factor = -(pv * np.where(pv > 0, np.log2(pv), 0.0)).sum(1)  # [S+1]
        best = np.nanargmax(np.where(np.isnan(rate), -1.0, rate), axis=1)  # [S+1, n]
        best_rate = np.take_along_axis(np.nan_to_num(rate, nan=-1.0), best[:, None, :], axis=1)[:, 0]  # [S+1, n]
        ss, ff = np.nonzero((fired > 0) & (total[:, None] > 0))  # [R] step-major, latents ascending
        cols["feature_id"].append(ff.astype(np.int64))
        cols["factor"] += [factor] * len(ff)
        cols["step"].append(steps[ss].astype(np.int64))
        cols["best_value"] += [values[b] for b in best[ss, ff]]
        cols["mutual_info"].append(mi[ss, ff])
        with np.errstate(divide="ignore", invalid="ignore"):
            cols["normalized_mi"].append(np.where(h_factor[ss] > 0, mi[ss, ff] / h_factor[ss], 0.0))
            cols["lift"].append(best_rate[ss, ff] / p_fire[ss, ff])
        cols["best_rate"].append(best_rate[ss, ff])
    arrays = {k: (v if k in ("factor", "best_value") else np.concatenate(v) if v else np.zeros(0))
              for k, v in cols.items()}
    return FactorAssociation(**arrays)


def scored_factors(asked: ConditionFactors) -> ConditionFactors:
    """The factors some condition asks for (a prompt set that names no colour has no colour rows)."""
    keep = [j for j in range(len(asked.names)) if (asked.codes[:, j] != UNASKED).any()]
    return ConditionFactors(tuple(asked.names[j] for j in keep), tuple(asked.values[j] for j in keep),
                            asked.codes[:, keep], asked.unknown)
