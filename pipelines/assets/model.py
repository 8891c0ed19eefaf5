"""Model stage: the bundled digits, the DiT checkpoint, the judge and the DiT's sample quality."""

import dagster as dg

from pipelines import model_ops
from pipelines.plots import markdown_image
from pipelines.resources import TideResource

GROUP = "model"
JUDGE_MIN_ACCURACY = 0.97
SAMPLE_MIN_ACCURACY = 0.90

@dg.asset(group_name=GROUP, kinds={"numpy"})
def digits(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
    """scikit-learn's 1,797 handwritten digits (8x8), upsampled to the DiT's image size in [-1, 1]."""
    import numpy as np

    from pipelines.plots import image_grid, png_bytes_of_array
    from tide_core.digits import load_digits
    from tide_core.sampling import to_uint8

    data = load_digits(tide.project().config.model.digits.image_size)
    pick = np.concatenate([np.flatnonzero(data.labels == c)[:10] for c in range(10)])
    grid = png_bytes_of_array(image_grid(to_uint8(data.images[pick]), rows=10, cols=10))
    counts = {str(c): int((data.labels == c).sum()) for c in range(10)}
    return dg.MaterializeResult(metadata={
        "num_images": len(data), "image_shape": str(list(data.images.shape[1:])),
        "per_class": dg.MetadataValue.json(counts), "grid": dg.MetadataValue.md(markdown_image(grid, "digits")),
    })

@dg.asset(group_name=GROUP, deps=[digits], kinds={"pytorch"})
def dit_model(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
    """The DiT: the embedded default (trained on the digits, reused while its config is unchanged) or a
    diffusers checkpoint named by model.source."""
    from pipelines.plots import line_plot

    status = model_ops.ensure_dit(tide.project(), log=context.log.info)
    meta = status.meta
    md: dict = {"path": status.path, "trained_now": status.trained_now, "fingerprint": status.fingerprint}
    if meta:
        cfg = meta.get("digits_config", {})
        curve = meta.get("loss_curve", {})
        md.update({
            "train_steps": cfg.get("train_steps"), "train_seconds": meta.get("train_seconds"),
            "final_loss": meta.get("final_loss"), "command": meta.get("command"),
            "weights_sha256": meta.get("weights_sha256"),
            "architecture": dg.MetadataValue.json({k: cfg.get(k) for k in (
                "image_size", "patch_size", "num_layers", "num_heads", "head_dim")}),
        })
        if curve:
            png = line_plot({"loss": (curve["step"], curve["loss"])}, "step", "eps MSE", "DiT training loss",
                            logy=True)
            md["loss_curve"] = dg.MetadataValue.md(markdown_image(png, "loss"))
    return dg.MaterializeResult(metadata=md)

@dg.asset(group_name=GROUP, deps=[digits], kinds={"pytorch"})
def digit_classifier(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
    """The judge: a small CNN trained on a stratified split of the digits; scores generated images."""
    status = model_ops.ensure_judge(tide.project(), log=context.log.info)
    return dg.MaterializeResult(metadata={
        "test_accuracy": dg.MetadataValue.float(status.test_accuracy),
        "train_accuracy": dg.MetadataValue.float(status.train_accuracy),
        "path": status.path, "trained_now": status.trained_now,
    })

@dg.asset(group_name=GROUP, deps=[dit_model, digit_classifier], kinds={"pytorch"})
def sample_quality(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
    """Class accuracy and Frechet distance (judge features) of images sampled with the run's sampler."""
    project = tide.project()
    if project.config.model.source != "digits":
        return dg.MaterializeResult(metadata={"skipped": "the judge only knows digits"})
    r = model_ops.measure_quality(project, log=context.log.info)
    per_class = {str(c): round(a, 3) for c, a in enumerate(r.per_class_accuracy)}
    return dg.MaterializeResult(metadata={
        "class_accuracy": dg.MetadataValue.float(r.accuracy),
        "frechet_distance": dg.MetadataValue.float(r.frechet_distance),
        "frechet_distance_real_vs_real": dg.MetadataValue.float(r.frechet_distance_real_split),
        "per_class_accuracy": dg.MetadataValue.json(per_class),
        "n_samples": r.n, "guidance_scale": r.guidance_scale, "num_steps": r.num_steps,
        "scheduler": r.scheduler, "sampling_seconds": r.seconds,
        "samples_by_class": dg.MetadataValue.md(markdown_image(r.grid_png, "samples")),
    })

@dg.asset_check(asset=digit_classifier, description=f"judge test accuracy >= {JUDGE_MIN_ACCURACY}")
def judge_is_accurate(tide: TideResource) -> dg.AssetCheckResult:
    import json

    meta = json.loads((tide.project().judge_dir / "judge.json").read_text())
    acc = meta["test_accuracy"]
    return dg.AssetCheckResult(passed=acc >= JUDGE_MIN_ACCURACY, metadata={"test_accuracy": acc})

@dg.asset_check(asset=sample_quality, description=f"judge class accuracy of samples >= {SAMPLE_MIN_ACCURACY}",
                blocking=False)
def samples_are_recognisable(tide: TideResource) -> dg.AssetCheckResult:
    import json

    path = tide.project().root / "sample_quality.json"
    if not path.exists():
        return dg.AssetCheckResult(passed=True, metadata={"skipped": "not a digits model"})
    acc = json.loads(path.read_text())["accuracy"]
    return dg.AssetCheckResult(passed=acc >= SAMPLE_MIN_ACCURACY, metadata={"class_accuracy": acc},
                               severity=dg.AssetCheckSeverity.WARN)

ASSETS = [digits, dit_model, digit_classifier, sample_quality]
CHECKS = [judge_is_accurate, samples_are_recognisable]
