"""The spliced evaluation: what the DiT does with an SAE's reconstruction in place of one site's output.

Model-agnostic figures, for every family:
* denoiser loss: held-out images (the run's own, encoded into the denoiser's space) noised at the captured
  steps' timesteps with seeded noise; the noise-prediction MSE without the SAE (clean), with the
  reconstruction spliced in, and with the site's output replaced by the SAE's reconstruction of no latents
  at all (ablated). ``loss_recovered`` = (ablated - spliced) / (ablated - clean): 1 = the SAE loses nothing.
* images: the held-out seeds sampled again with the reconstruction spliced in at every step, against their
  stored (unspliced) images: pixel MSE, and the Frechet distance between the two sets in the family's feature
  space (its judge's features, else pooled pixels).
Plus, when the family has a judge: its accuracy on both sets, their agreement, and both sets' Frechet
distance to the judge's real images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.context import Log, RunContext
from storage import ActivationStore
from tide_core.factors import UNASKED, asked_accuracy
from tide_core.models.base import Judge, Judgement
from tide_core.quality import frechet_distance, pixel_features
from tide_core.sampling import Sampler, condition_for, from_uint8, spread_steps, to_uint8
from tide_core.splice import SAESplice

LOSS_TIMESTEPS = 10  # timesteps the denoiser loss is averaged over (evenly spread over the captured ones)
LOSS_SEED = 20_250  # seed of the noise the denoiser loss adds


@dataclass(frozen=True)
class SpliceReport:
    """One SAE spliced in (a `sae_splice` row)."""

    split: str
    n_samples: int
    loss_clean: float
    loss_spliced: float
    loss_ablated: float
    loss_recovered: float
    pixel_mse: float
    frechet_to_unspliced: float
    accuracy_spliced: float | None = None
    accuracy_unspliced: float | None = None
    frechet_spliced: float | None = None
    frechet_unspliced: float | None = None
    agreement: float | None = None


@dataclass
class SpliceBench:
    """What the spliced evaluation of one (layer, site) needs, made once and shared by every variant."""

    sampler: Sampler
    layer: int
    site: str
    ids: np.ndarray  # int64 [n] held-out sample ids
    conditions: np.ndarray  # int64 [n]
    want_class: np.ndarray  # int64 [n] the class each condition asks for (UNASKED: a prompt that names none)
    original: np.ndarray  # uint8 [n, H, W, C] the stored (unspliced) images
    timesteps: list[int]  # where the denoiser loss is measured
    loss_clean: float
    judge: Judge | None
    original_verdict: Judgement | None
    real_features: np.ndarray | None  # the judge's features of its real training images


def make_splice_bench(ctx: RunContext, store: ActivationStore, layer: int, site: str,
                      heldout: np.ndarray) -> SpliceBench:
    ids = heldout[:ctx.config.sae.splice_samples]
    conditions = np.array([condition_for(int(i), store.provenance["sampling"]["classes"]) for i in ids])
    original = store.images(int(ids[0]), int(ids[-1]) + 1)[ids - ids[0]]
    steps = store.provenance["capture_timesteps"]
    sampler = ctx.sampler()
    want = np.full(len(ids), UNASKED, np.int64)
    if ctx.family.judge_class is not None:
        names = [str(c) for c in store.provenance["class_names"]]
        want = ctx.family.judge_class.asked_classes(names)[conditions]
    bench = SpliceBench(sampler=sampler, layer=layer, site=site, ids=ids, conditions=conditions, want_class=want,
                        original=original, timesteps=spread_steps(steps, LOSS_TIMESTEPS), loss_clean=0.0,
                        judge=ctx.judge, original_verdict=None, real_features=None)
    bench.loss_clean = denoiser_loss(bench, None)
    if bench.judge is not None:
        real, _ = ctx.family.judge_class.reference_images(ctx.config)
        bench.real_features = bench.judge.judge(real).features
        bench.original_verdict = bench.judge.judge(from_uint8(original))
    return bench


@torch.no_grad()
def denoiser_loss(bench: SpliceBench, hook: SAESplice | None, batch_size: int = 64) -> float:
    """Mean MSE of the denoiser's training objective (noise, or velocity for flow matching) over the bench's
    images and timesteps, with ``hook`` installed (None: the clean model). The noise is seeded, so every hook
    sees the same noised inputs."""
    model = bench.sampler.model
    x0 = model.encode(torch.from_numpy(from_uint8(bench.original)).to(model.device))  # [n, C, h, w]
    gen = torch.Generator("cpu").manual_seed(LOSS_SEED)
    total, count = 0.0, 0
    for t in bench.timesteps:
        noise = torch.randn(x0.shape, generator=gen).to(model.device)
        tt = torch.full((len(x0),), t, dtype=torch.long, device=model.device)
        xt, target = model.training_pair(x0, noise, tt)  # noised [n, C, h, w]; eps or velocity [n, C, h, w]
        tt = model.time.model_time(tt)
        if hook is not None:
            hook.set_timestep(t)
        for i in range(0, len(x0), batch_size):
            cond = torch.as_tensor(bench.conditions[i:i + batch_size], device=model.device)
            out = model.predict_noise(xt[i:i + batch_size], tt[i:i + batch_size], cond)
            total += float((out - target[i:i + batch_size]).pow(2).sum())
            count += out.numel()
    return total / max(count, 1)


def _loss_with(bench: SpliceBench, hook: SAESplice) -> float:
    with hook:
        return denoiser_loss(bench, hook)


def splice_eval(bench: SpliceBench, sae, log: Log) -> SpliceReport:
    """Resample held-out seeds with the SAE spliced in; compare with the stored (unspliced) images; and the
    denoiser loss spliced and ablated against the clean one."""
    model = bench.sampler.model
    spliced_loss = _loss_with(bench, SAESplice(model, bench.layer, sae, site=bench.site))
    ablated_loss = _loss_with(bench, SAESplice(model, bench.layer, sae, site=bench.site, ablate=True))
    images = []
    with SAESplice(model, bench.layer, sae, site=bench.site) as splice:
        for i in range(0, len(bench.ids), 64):
            images.append(bench.sampler.sample(bench.ids[i:i + 64], bench.conditions[i:i + 64],
                                               observer=splice).images)
    spliced = from_uint8(to_uint8(np.concatenate(images)))  # [n, C, H, W], rounded as stored images are
    original = from_uint8(bench.original)
    gap = ablated_loss - bench.loss_clean
    report = dict(split="heldout", n_samples=len(bench.ids), loss_clean=bench.loss_clean,
                  loss_spliced=spliced_loss, loss_ablated=ablated_loss,
                  loss_recovered=(ablated_loss - spliced_loss) / gap if gap else float("nan"),
                  pixel_mse=float(((spliced - original) ** 2).mean()))
    if bench.judge is not None:
        a, b = bench.judge.judge(spliced), bench.original_verdict
        report.update(frechet_to_unspliced=frechet_distance(a.features, b.features),
                      accuracy_spliced=asked_accuracy(a.pred, bench.want_class),
                      accuracy_unspliced=asked_accuracy(b.pred, bench.want_class),
                      frechet_spliced=frechet_distance(a.features, bench.real_features),
                      frechet_unspliced=frechet_distance(b.features, bench.real_features),
                      agreement=float((a.pred == b.pred).mean()))
    else:
        report.update(frechet_to_unspliced=frechet_distance(pixel_features(spliced), pixel_features(original)))
    out = SpliceReport(**report)
    log(f"  spliced {sae.meta.get('sae_id', '')}: " + json.dumps(
        {k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}))
    return out
