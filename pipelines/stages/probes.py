"""Factor probes of the feature stage: `factor_probes` rows for the SAEs of one (layer, site).

For families whose judge knows factors (the styled digits): the final images are judged once, the block's
activations are read once per probed step, and the raw-channel baseline is probed once per layer; each SAE
then adds its k-sparse probes (``tide_core.features.probes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.context import RunContext
from storage import ActivationStore
from tide_core.features.probes import PROBE_KS, RAW_PROBE, ProbeRows, factor_probes, pooled
from tide_core.sampling import from_uint8, spread_steps


@dataclass(frozen=True)
class LayerProbeInputs:
    """What every SAE of one (layer, site) is probed on."""

    acts: dict[int, np.ndarray]  # step -> float16 [N, P, d] activations of the probed images
    timesteps: dict[int, int]  # step -> its timestep
    labels: np.ndarray  # int64 [N, F] the factor values the judge sees in each final image
    factor_names: tuple[str, ...]
    raw: pa.Table  # the raw-channel probes' rows (k = 0), without sae_id


def probe_inputs(ctx: RunContext, store: ActivationStore, layer: int, site: str) -> LayerProbeInputs | None:
    """The layer's probe inputs, or None where there are no probes: probes off, a family without a factor
    judge (or the judge not trained yet), or a text site (its tokens are words, not image patches)."""
    cfg = ctx.config.features
    judge = ctx.judge
    if cfg.probe_steps == 0 or judge is None or store.layout.is_text(site):
        return None
    act = store.layout.act_samples
    verdict = judge.judge(from_uint8(store.images(act.start, act.stop)))
    if verdict.factors is None:
        return None  # a judge of classes alone: the class probe is the features table's selectivity
    names = ctx.family.judge_class.condition_factors([]).names
    steps = spread_steps(store.layout.steps, cfg.probe_steps)
    by_step = dict(zip(store.layout.steps, store.provenance["capture_timesteps"], strict=True))
    acts = {s: store.read_step(site, layer, s) for s in steps}  # [N, P, d] each, read once for every SAE
    labels = np.asarray(verdict.factors, np.int64)  # [N, F]
    rows = factor_probes({s: pooled(a) for s, a in acts.items()}, labels, names, (RAW_PROBE,), cfg.probe_folds)
    return LayerProbeInputs(acts, {s: int(by_step[s]) for s in steps}, labels, names, probe_table(rows))


def sae_probes(inputs: LayerProbeInputs, sae, folds: int) -> pa.Table:
    """factor_probes rows of one SAE: its k-sparse probes and the layer's raw-channel baseline."""
    latents = {}
    for step, acts in inputs.acts.items():
        t = inputs.timesteps[step] if sae.spec.modulated else None
        latents[step] = pooled(acts, lambda x, t=t: sae.encode(x, t))  # [N, n_latents]
    rows = factor_probes(latents, inputs.labels, inputs.factor_names, PROBE_KS, folds)
    return pa.concat_tables([inputs.raw, probe_table(rows)])


def probe_table(rows: ProbeRows) -> pa.Table:
    return pa.table({
        "factor": pa.array(rows.factor, pa.string()), "step": pa.array(rows.step.astype(np.int32)),
        "k": pa.array(rows.k.astype(np.int32)), "accuracy": pa.array(rows.accuracy),
        "accuracy_std": pa.array(rows.accuracy_std), "chance": pa.array(rows.chance),
        "n_images": pa.array(rows.n_images.astype(np.int32)), "n_values": pa.array(rows.n_values.astype(np.int32)),
        "features": pa.array(rows.features, pa.list_(pa.int32())),
    })
