"""Model-stage operations behind the assets and the CLI: the default DiT, the judge, sample quality.

torch is imported inside functions: Dagster imports every definitions module at each load.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.project import Project, content_key
from tide_core.config import DIGITS_SOURCE

Log = Callable[[str], None]


@dataclass(frozen=True)
class DiTStatus:
    """The DiT checkpoint in force and whether this call trained it."""

    path: str
    trained_now: bool
    fingerprint: str
    meta: dict


def read_model_meta(ckpt: Path) -> dict:
    p = ckpt / "tide_model.json"
    return json.loads(p.read_text()) if p.exists() else {}


def ensure_dit(project: Project, log: Log = print, force: bool = False) -> DiTStatus:
    """Reuse the default DiT checkpoint when its recorded config matches; otherwise train it."""
    cfg = project.config.model
    if cfg.source != DIGITS_SOURCE:
        return DiTStatus(path=cfg.source, trained_now=False, fingerprint="", meta={})
    dcfg = cfg.digits
    ckpt = project.dit_checkpoint
    meta = read_model_meta(ckpt)
    if not force and meta.get("digits_fingerprint") == dcfg.fingerprint():
        log(f"default DiT at {ckpt} matches the config (fingerprint {dcfg.fingerprint()}): reusing it")
        return DiTStatus(path=str(ckpt), trained_now=False, fingerprint=dcfg.fingerprint(), meta=meta)
    if meta:
        log(f"checkpoint at {ckpt} was trained with another config "
            f"({meta.get('digits_fingerprint')} != {dcfg.fingerprint()}): retraining")
    from tide_core.train_dit import train_and_save

    log(f"training the default DiT: {dcfg.train_steps} steps, batch {dcfg.batch_size}, seed {dcfg.seed}")
    every = max(1, dcfg.train_steps // 20)

    def progress(step: int, loss: float, lr: float) -> None:
        if step % every == 0 or step == dcfg.train_steps:
            log(f"  step {step}/{dcfg.train_steps}  loss {loss:.4f}  lr {lr:.2e}")

    result = train_and_save(dcfg, ckpt, progress=progress)
    log(f"trained in {result.seconds:.0f}s ({result.steps_per_second:.2f} steps/s); saved to {ckpt}")
    return DiTStatus(path=str(ckpt), trained_now=True, fingerprint=dcfg.fingerprint(),
                     meta=read_model_meta(ckpt))


@dataclass(frozen=True)
class JudgeStatus:
    path: str
    trained_now: bool
    test_accuracy: float
    train_accuracy: float


def _judge_fingerprint(project: Project) -> dict:
    j = project.config.model.judge
    return {"epochs": j.epochs, "test_fraction": j.test_fraction, "seed": j.seed,
            "image_size": project.config.model.digits.image_size}


def ensure_judge(project: Project, log: Log = print) -> JudgeStatus:
    """Train the digit classifier on its split (or reuse one trained with the same settings)."""
    out = project.judge_dir
    meta_path = out / "judge.json"
    want = _judge_fingerprint(project)
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == want and (out / "judge.safetensors").exists():
            log(f"judge at {out} matches the config: reusing it (test accuracy {meta['test_accuracy']:.4f})")
            return JudgeStatus(str(out), False, meta["test_accuracy"], meta["train_accuracy"])
    from tide_core.digits import load_digits, split
    from tide_core.judge import save_judge, train_judge

    j = project.config.model.judge
    train, test = split(load_digits(want["image_size"]), j.test_fraction, j.seed)
    log(f"training the judge on {len(train)} digits, testing on {len(test)}")
    result = train_judge(train, test, epochs=j.epochs, seed=j.seed)
    save_judge(result, out)
    meta = json.loads(meta_path.read_text())
    meta["settings"] = want
    meta_path.write_text(json.dumps(meta, indent=2))
    log(f"judge test accuracy {result.test_accuracy:.4f}")
    return JudgeStatus(str(out), True, result.test_accuracy, result.train_accuracy)


@dataclass(frozen=True)
class QualityReport:
    """Judge's verdict on freshly sampled images of the configured sampler."""

    accuracy: float
    per_class_accuracy: list[float]
    frechet_distance: float
    frechet_distance_real_split: float
    n: int
    guidance_scale: float
    num_steps: int
    scheduler: str
    seconds: float
    grid_png: bytes


def measure_quality(project: Project, log: Log = print) -> QualityReport:
    """Sample quality_samples images (class-balanced) and judge them against the real digits."""
    import time

    import numpy as np

    from pipelines.plots import image_grid, png_bytes_of_array
    from tide_core.digits import load_digits, split
    from tide_core.dit import load_model
    from tide_core.judge import load_judge, sample_quality
    from tide_core.sampling import Sampler, to_uint8

    cfg = project.config
    s = cfg.sampling
    key = _quality_key(project)
    reused = _reuse_quality(project, key)
    if reused is not None:
        log(f"sample quality of this model, sampler and judge (key {key}) is on record: reusing it "
            f"(class accuracy {reused.accuracy:.3f}); delete {project.root / 'sample_quality.json'} to measure again")
        return reused
    bundle = load_model(cfg.model, project.base_dir)
    sampler = Sampler(bundle, s.scheduler, s.num_steps, s.guidance_scale, seed=s.seed + 1_000_003)
    n = cfg.model.judge.quality_samples
    ids = np.arange(n)
    classes = ids % bundle.num_classes
    t0 = time.perf_counter()
    chunks = []
    for i in range(0, n, s.batch_size):
        chunks.append(sampler.sample(ids[i:i + s.batch_size], classes[i:i + s.batch_size]).images)
        log(f"  sampled {min(n, i + s.batch_size)}/{n} images for the quality check")
    images = np.concatenate(chunks)  # [n, 1, H, W]
    seconds = time.perf_counter() - t0
    j = cfg.model.judge
    real = load_digits(cfg.model.digits.image_size)
    train, test = split(real, j.test_fraction, j.seed)
    q = sample_quality(load_judge(project.judge_dir), images, classes, train, real_reference=test)
    order = np.argsort(classes, kind="stable")
    per = min(10, n // bundle.num_classes)
    pick = np.concatenate([order[classes[order] == c][:per] for c in range(bundle.num_classes)])
    grid = png_bytes_of_array(image_grid(to_uint8(images[pick]), rows=bundle.num_classes, cols=per))
    report = QualityReport(accuracy=q.accuracy, per_class_accuracy=q.per_class_accuracy,
                           frechet_distance=q.frechet_distance,
                           frechet_distance_real_split=q.frechet_distance_real_split, n=n,
                           guidance_scale=s.guidance_scale, num_steps=s.num_steps, scheduler=s.scheduler,
                           seconds=round(seconds, 1), grid_png=grid)
    project.root.mkdir(parents=True, exist_ok=True)
    (project.root / "sample_quality.png").write_bytes(grid)
    summary = {k: v for k, v in asdict(report).items() if k != "grid_png"}
    (project.root / "sample_quality.json").write_text(json.dumps({**summary, "key": key}, indent=2))
    return report


def _quality_key(project: Project) -> str:
    """What the quality numbers depend on: the default DiT (its recorded config and weights hash, read
    without loading it), the sampler, the sample count and the judge (its settings and trained weights)."""
    import hashlib

    meta = read_model_meta(project.dit_checkpoint)
    model = {"digits": meta.get("digits_fingerprint"), "weights": meta.get("weights_sha256")}
    judge = project.judge_dir / "judge.safetensors"
    return content_key({"model": model, "sampling": project.config.sampling.model_dump(),
                        "n": project.config.model.judge.quality_samples, "judge": _judge_fingerprint(project),
                        "judge_weights": hashlib.sha256(judge.read_bytes()).hexdigest() if judge.exists() else None})


def _reuse_quality(project: Project, key: str) -> QualityReport | None:
    """The recorded report if it was measured under ``key`` (and its sample grid is there)."""
    path, grid = project.root / "sample_quality.json", project.root / "sample_quality.png"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if summary.pop("key", None) != key or not grid.exists():
        return None
    return QualityReport(**summary, grid_png=grid.read_bytes())
