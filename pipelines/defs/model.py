"""Model assets: the DiT's weights, and (for families with a judge) the judge and the sample quality."""

import hashlib
import math
from pathlib import Path

import dagster as dg

from pipelines.defs.automation import daily_or_up_to_date, up_to_date
from pipelines.defs.resources import TideResource
from pipelines.defs.versions import code_version
from pipelines.plots import line_plot, markdown_image
from pipelines.project import Project

GROUP = "model"
JUDGE_MIN_ACCURACY = 0.97
SAMPLE_MIN_ACCURACY = 0.90  # the class
STYLE_MIN_ACCURACY = 0.95  # every other factor a judge scores (the styled digits' colour, thickness, background)


def build(project: Project, has_judge: bool, text: bool) -> tuple[list, list]:
    """dit_model, then judge and sample_quality (families with a judge) or prompts (text-conditional ones)."""
    cfg = project.config

    @dg.asset(group_name=GROUP, kinds={"pytorch"}, code_version=code_version("dit_model", cfg),
              automation_condition=daily_or_up_to_date())
    def dit_model(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
        """The DiT: the embedded default (trained on the digits unless the checkpoint records this config)
        or the diffusers checkpoint named by model.source. Its data version is the weights' identity."""
        from pipelines.stages.model import prepare_model

        status = prepare_model(tide.context(context))
        meta = status.meta
        md: dict = {"path": status.path, "trained_now": status.trained_now, "fingerprint": status.fingerprint}
        curve = meta.get("loss_curve", {})
        if meta:
            md.update({"train_seconds": meta.get("train_seconds"), "final_loss": meta.get("final_loss"),
                       "command": meta.get("command"), "weights_sha256": meta.get("weights_sha256")})
        if curve:
            png = line_plot({"loss": (curve["step"], curve["loss"])}, "step", "eps MSE", "DiT training loss",
                            logy=True)
            md["loss_curve"] = dg.MetadataValue.md(markdown_image(png, "loss"))
        return dg.MaterializeResult(metadata=md, data_version=dg.DataVersion(status.fingerprint))

    assets = [dit_model, *([prompts_asset(project, dit_model)] if text else [])]
    if not has_judge:
        return assets, []

    @dg.asset(group_name=GROUP, kinds={"pytorch"}, code_version=code_version("judge", cfg),
              automation_condition=up_to_date(),
              check_specs=[dg.AssetCheckSpec("judge_is_accurate", asset="judge",
                                             description=f"test accuracy >= {JUDGE_MIN_ACCURACY}")])
    def judge(context: dg.AssetExecutionContext, tide: TideResource):
        """The model family's judge of generated images, trained on a split of its own data."""
        from pipelines.stages.model import train_judge

        r = train_judge(tide.context(context))
        md = {"test_accuracy": dg.MetadataValue.float(r.test_accuracy),
              "train_accuracy": dg.MetadataValue.float(r.train_accuracy), "path": r.path}
        if r.per_factor:  # test_accuracy is then the weakest head's
            md["test_accuracy_per_factor"] = dg.MetadataValue.json({k: round(v, 4) for k, v in r.per_factor.items()})
        yield dg.MaterializeResult(metadata=md)
        yield dg.AssetCheckResult(check_name="judge_is_accurate", passed=r.test_accuracy >= JUDGE_MIN_ACCURACY,
                                  metadata={"test_accuracy": r.test_accuracy})

    @dg.asset(group_name=GROUP, deps=[*assets, judge], kinds={"pytorch"},
              code_version=code_version("sample_quality", cfg), automation_condition=up_to_date(),
              check_specs=[dg.AssetCheckSpec("samples_are_recognisable", asset="sample_quality", blocking=False,
                                             description=f"class accuracy of samples >= {SAMPLE_MIN_ACCURACY}, "
                                                         f"every other factor's >= {STYLE_MIN_ACCURACY}")])
    def sample_quality(context: dg.AssetExecutionContext, tide: TideResource):
        """The judge's verdict on images sampled with the run's sampler (other seeds than the run's): accuracy
        per condition and a Frechet distance in the judge's feature space, with the real-vs-real floor."""
        from pipelines.stages.model import measure_quality

        r = measure_quality(tide.context(context))
        targets = {f: SAMPLE_MIN_ACCURACY if i == 0 else STYLE_MIN_ACCURACY for i, f in enumerate(r.per_factor_accuracy)}
        # a factor no prompt asks for has no accuracy (NaN): values_not_asked names it, the check cannot
        failed = {f: a for f, a in r.per_factor_accuracy.items() if not math.isnan(a) and not a >= targets[f]}
        factors = {}
        if len(r.per_factor_accuracy) > 1:  # a judge of several factors: each with its values and grid
            factors = {"per_factor_accuracy": dg.MetadataValue.json({k: round(v, 4) for k, v in
                                                                      r.per_factor_accuracy.items()}),
                       "per_value_accuracy": dg.MetadataValue.json({f: {v: round(a, 3) for v, a in d.items()}
                                                                    for f, d in r.per_value_accuracy.items()}),
                       "values_not_asked": dg.MetadataValue.json(r.missing_values),
                       "unscored_words": dg.MetadataValue.json(r.unknown_words),
                       **{f"samples_by_{f}": dg.MetadataValue.md(markdown_image(png, f))
                          for f, png in r.factor_grids.items()}}
        yield dg.MaterializeResult(metadata={**factors,
            "class_accuracy": dg.MetadataValue.float(r.accuracy),
            "frechet_distance": dg.MetadataValue.float(r.frechet_distance),
            "frechet_distance_real_vs_real": dg.MetadataValue.float(r.frechet_distance_real_split),
            "per_class_accuracy": dg.MetadataValue.json({str(c): round(a, 3)
                                                         for c, a in enumerate(r.per_condition_accuracy)}),
            "n_samples": r.n, "guidance_scale": r.guidance_scale, "num_steps": r.num_steps,
            "scheduler": r.scheduler, "sampling_seconds": r.seconds,
            "samples_by_class": dg.MetadataValue.md(markdown_image(r.grid_png, "samples")),
        })
        yield dg.AssetCheckResult(check_name="samples_are_recognisable", passed=not failed,
                                  metadata={"class_accuracy": r.accuracy, "below_target": dg.MetadataValue.json(failed)},
                                  severity=dg.AssetCheckSeverity.WARN)

    return [*assets, judge, sample_quality], []


def prompts_asset(project: Project, dit_model: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """The prompt file as data: its code version carries the file's hash, so editing the file makes the
    asset (and the capture after it) stale."""
    cfg = project.config
    digest = prompt_file_hash(cfg.sampling.prompts)

    @dg.asset(name="prompts", group_name=GROUP, deps=[dit_model], kinds={"duckdb"}, pool="tide_duckdb",
              code_version=code_version("prompts", cfg, digest), automation_condition=up_to_date())
    def prompts(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
        """The run's prompts (sampling.prompts): the `prompts` table, with each prompt's token count and
        whether model.max_prompt_tokens truncates it. Samples take them round-robin by sample id."""
        from pipelines.stages.prompts import publish_prompts

        r = publish_prompts(tide.context(context))
        return dg.MaterializeResult(data_version=dg.DataVersion(f"{r.sha256[:16]}:{r.max_tokens}"), metadata={
            "prompts": r.prompts, "distinct": r.distinct, "truncated": r.truncated, "max_tokens": r.max_tokens,
            "file_sha256": r.sha256})

    return prompts


def prompt_file_hash(path: str | None) -> str:
    """The first 12 hex digits of the prompt file's sha256 ("missing" when it cannot be read: the preflight
    and the asset then say why)."""
    if path is None:
        return ""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    except OSError:
        return "missing"
