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
from tide_core.factors import factor_accuracy
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
    test_accuracy: float  # the weakest head's, for a judge of several factors
    train_accuracy: float
    per_factor: dict[str, float] | None = None  # test accuracy of each head (judges of several factors)


def train_judge(ctx: RunContext) -> JudgeReport:
    judge_class = ctx.family.judge_class
    if judge_class is None:
        raise ValueError(f"the {ctx.family.family} family has no judge")
    out = ctx.project.judge_dir
    out.mkdir(parents=True, exist_ok=True)
    record = judge_class.train(ctx.config, out, ctx.log)
    return JudgeReport(str(out), record["test_accuracy"], record["train_accuracy"],
                       record.get("test_accuracy_per_factor"))


@dataclass(frozen=True)
class QualityReport:
    """The judge's verdict on images sampled with the run's sampler (other seeds than the run's)."""

    accuracy: float  # fraction the judge assigns to the class they were sampled for
    per_condition_accuracy: list[float]  # class accuracy per condition
    per_factor_accuracy: dict[str, float]  # over the images whose condition asks for a value of the factor
    per_value_accuracy: dict[str, dict[str, float]]  # factor -> value -> accuracy
    missing_values: dict[str, list[str]]  # factor values no condition asks for (not measured)
    unknown_words: dict[str, int]  # prompt words the judge cannot score -> prompts using them
    frechet_distance: float  # generated vs the judge's real training images, in its feature space
    frechet_distance_real_split: float  # real held-out vs real training images: the floor at this size
    n: int
    guidance_scale: float
    num_steps: int
    scheduler: str
    seconds: float
    grid_png: bytes  # the class grid: a row per class
    factor_grids: dict[str, bytes]  # per factor, a row per value it was asked for


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
    asked = ctx.family.judge_class.condition_factors(list(ctx.model.condition_names))
    if asked.missing_values():
        ctx.log(f"the conditions never ask for {asked.missing_values()}: those values are not measured")
    if asked.unknown_words():
        ctx.log(f"words no judge head scores (still sampled): {asked.unknown_words()}")
    verdict = judge.judge(images)
    real = judge.judge(real_train).features
    acc = factor_accuracy(asked, conditions, verdict.factor_pred)
    want_class = asked.codes[conditions, 0]  # [n]
    per = [float((verdict.pred[conditions == c] == want_class[conditions == c]).mean())
           if (conditions == c).any() else float("nan") for c in range(n_cond)]
    grids = {name: png for j, name in enumerate(asked.names)  # the factors some prompt asks for
             if (png := factor_grid_png(images, asked.codes[conditions, j], len(asked.values[j]))) is not None}
    if asked.names[0] not in grids:  # no prompt names a class: the first images, unsorted
        grids[asked.names[0]] = png_bytes_of_array(image_grid(to_uint8(images[:10]), rows=1, cols=min(10, n)))
    report = QualityReport(
        accuracy=acc.per_factor[asked.names[0]], per_condition_accuracy=per, per_factor_accuracy=acc.per_factor,
        per_value_accuracy=acc.per_value, missing_values=asked.missing_values(), unknown_words=asked.unknown_words(),
        frechet_distance=frechet_distance(verdict.features, real),
        frechet_distance_real_split=frechet_distance(judge.judge(real_test).features, real),
        n=n, guidance_scale=s.guidance_scale, num_steps=s.num_steps, scheduler=s.scheduler,
        seconds=round(seconds, 1), grid_png=grids[asked.names[0]], factor_grids=grids)
    root = ctx.project.root
    root.mkdir(parents=True, exist_ok=True)
    (root / QUALITY_GRID).write_bytes(report.grid_png)
    for name, png in grids.items():
        if name != asked.names[0]:
            (root / f"sample_quality_{name}.png").write_bytes(png)
    summary = {k: v for k, v in asdict(report).items() if k not in ("grid_png", "factor_grids")}
    (root / QUALITY_FILE).write_text(json.dumps(summary, indent=2))
    return report


def factor_grid_png(images: np.ndarray, want: np.ndarray, n_values: int, cols: int = 10) -> bytes | None:
    """A row per value asked for (want: int64 [n], UNASKED where none), its first ``cols`` images by id; None
    when no image asks for any value."""
    rows = [np.flatnonzero(want == v)[:cols] for v in range(n_values)]
    rows = [r for r in rows if len(r)]
    if not rows:
        return None
    cols = min(cols, min(len(r) for r in rows))
    pick = np.concatenate([r[:cols] for r in rows])
    return png_bytes_of_array(image_grid(to_uint8(images[pick]), rows=len(rows), cols=cols))
