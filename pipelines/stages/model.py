"""Model stage: the DiT's weights, the family's judge, and the judge's verdict on freshly sampled images.

Nothing here names a model family: the family class (``ctx.family``) prepares its weights and brings its
judge, or has none (then there is no judge and no sample-quality asset).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from pipelines.context import RunContext
from pipelines.plots import image_grid, png_bytes_of_array
from tide_core.models.base import ModelStatus
from tide_core.quality import frechet_distance
from tide_core.sampling import to_uint8

QUALITY_FILE = "sample_quality.json"
QUALITY_GRID = "sample_quality.png"
QUALITY_SEED_OFFSET = 1_000_003  # quality images use other seeds than the captured samples


def prepare_model(ctx: RunContext, force: bool = False) -> ModelStatus:
    """The configured model's weights, made available (trained, for the embedded family)."""
    return ctx.family.prepare(ctx.config.model, ctx.log, force=force)


@dataclass(frozen=True)
class JudgeReport:
    """The trained judge and its accuracy on its own held-out split."""

    path: str
    test_accuracy: float
    train_accuracy: float


def train_judge(ctx: RunContext) -> JudgeReport:
    judge_class = ctx.family.judge_class
    if judge_class is None:
        raise ValueError(f"the {ctx.family.family} family has no judge")
    out = ctx.project.judge_dir
    out.mkdir(parents=True, exist_ok=True)
    record = judge_class.train(ctx.config, out, ctx.log)
    return JudgeReport(str(out), record["test_accuracy"], record["train_accuracy"])


@dataclass(frozen=True)
class QualityReport:
    """The judge's verdict on images sampled with the run's sampler (other seeds than the run's)."""

    accuracy: float  # fraction the judge assigns to the condition they were sampled for
    per_condition_accuracy: list[float]
    frechet_distance: float  # generated vs the judge's real training images, in its feature space
    frechet_distance_real_split: float  # real held-out vs real training images: the floor at this size
    n: int
    guidance_scale: float
    num_steps: int
    scheduler: str
    seconds: float
    grid_png: bytes


def measure_quality(ctx: RunContext) -> QualityReport:
    """Sample model.judge.quality_samples images (conditions round-robin) and judge them."""
    cfg = ctx.config
    judge = ctx.judge
    if judge is None:
        raise ValueError("sample quality needs the family's judge: materialize `judge` first")
    s = cfg.sampling
    sampler = ctx.sampler(seed_offset=QUALITY_SEED_OFFSET)
    n_cond = len(ctx.model.condition_names)
    n = cfg.model.judge.quality_samples
    ids = np.arange(n)
    conditions = ids % n_cond
    t0 = time.perf_counter()
    chunks = []
    for i in range(0, n, s.batch_size):
        chunks.append(sampler.sample(ids[i:i + s.batch_size], conditions[i:i + s.batch_size]).images)
        ctx.log(f"  sampled {min(n, i + s.batch_size)}/{n} images for the quality check")
    images = np.concatenate(chunks)  # [n, C, H, W]
    seconds = time.perf_counter() - t0
    real_train, real_test = ctx.family.judge_class.reference_images(cfg)
    verdict = judge.judge(images)
    real = judge.judge(real_train).features
    per = [float((verdict.pred[conditions == c] == c).mean()) if (conditions == c).any() else float("nan")
           for c in range(n_cond)]
    order = np.argsort(conditions, kind="stable")
    cols = min(10, n // n_cond)
    pick = np.concatenate([order[conditions[order] == c][:cols] for c in range(n_cond)])
    grid = png_bytes_of_array(image_grid(to_uint8(images[pick]), rows=n_cond, cols=cols))
    report = QualityReport(
        accuracy=float((verdict.pred == conditions).mean()), per_condition_accuracy=per,
        frechet_distance=frechet_distance(verdict.features, real),
        frechet_distance_real_split=frechet_distance(judge.judge(real_test).features, real),
        n=n, guidance_scale=s.guidance_scale, num_steps=s.num_steps, scheduler=s.scheduler,
        seconds=round(seconds, 1), grid_png=grid)
    root = ctx.project.root
    root.mkdir(parents=True, exist_ok=True)
    (root / QUALITY_GRID).write_bytes(grid)
    summary = {k: v for k, v in asdict(report).items() if k != "grid_png"}
    (root / QUALITY_FILE).write_text(json.dumps(summary, indent=2))
    return report
