"""SAE stage: one partition per captured layer trains every variant; `sae_metrics` compares them."""

import dagster as dg

from pipelines.plots import line_plot, markdown_image
from pipelines.project import Project
from pipelines.resources import TideResource

GROUP = "sae"
MIN_EXPLAINED_VARIANCE = 0.90
MAX_DEAD_FRACTION = 0.05


def build(project: Project, samples_asset: dg.AssetsDefinition) -> tuple[list, list]:
    layers = dg.StaticPartitionsDefinition([f"{layer:02d}" for layer in sorted(project.config.capture.layers)])
    variants = project.config.sae.variants
    specs = [dg.AssetCheckSpec(name=f"{v}_explained_variance", asset="sae",
                               description=f"held-out explained variance of the {v} SAE >= "
                                           f"{MIN_EXPLAINED_VARIANCE}") for v in variants]
    specs += [dg.AssetCheckSpec(name=f"{v}_dead_fraction", asset="sae",
                                description=f"dead latents of the {v} SAE < {MAX_DEAD_FRACTION:.0%}")
              for v in variants]

    @dg.asset(group_name=GROUP, deps=[samples_asset], partitions_def=layers, check_specs=specs,
              kinds={"pytorch", "safetensors"}, pool="tide_duckdb")
    def sae(context: dg.AssetExecutionContext, tide: TideResource):
        """Every configured SAE variant of one layer, trained from one pass over the store, evaluated per
        step on train and held-out samples and spliced into the DiT; rows in saes / sae_metrics / sae_splice."""
        from pipelines.sae_ops import train_layer

        report = train_layer(tide.project(), int(context.partition_key), log=context.log.info)
        md: dict = {}
        for r in report.reports:
            h = r.metrics["heldout"][-1]
            md[f"{r.variant}_heldout"] = dg.MetadataValue.json({k: round(v, 5) for k, v in h.items()})
            md[f"{r.variant}_sae_id"] = r.sae_id
            if r.splice:
                md[f"{r.variant}_spliced"] = dg.MetadataValue.json(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in r.splice.items()})
        for key, label in (("nmse", "normalised MSE"), ("l0", "L0")):
            series = {}
            for r in report.reports:
                per = {s: m for s, m in r.metrics["heldout"].items() if s >= 0}
                steps = sorted(per)
                series[r.variant] = (steps, [per[s][key] for s in steps])
            png = line_plot(series, "step (0 = noisiest)", label, f"layer {report.layer}, held-out")
            md[f"{key}_by_step"] = dg.MetadataValue.md(markdown_image(png, key))
        yield dg.MaterializeResult(metadata=md)
        for r in report.reports:
            h = r.metrics["heldout"][-1]
            yield dg.AssetCheckResult(check_name=f"{r.variant}_explained_variance",
                                      passed=h["explained_variance"] >= MIN_EXPLAINED_VARIANCE,
                                      metadata={"explained_variance": h["explained_variance"]})
            yield dg.AssetCheckResult(check_name=f"{r.variant}_dead_fraction",
                                      passed=h["dead_fraction"] < MAX_DEAD_FRACTION,
                                      metadata={"dead_fraction": h["dead_fraction"]})

    @dg.asset(group_name=GROUP, deps=[sae], kinds={"duckdb"}, pool="tide_duckdb")
    def sae_metrics(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
        """Per-step comparison of the variants across layers (reads v_sae_metrics)."""
        from pipelines.sae_report import summarise

        s = summarise(tide.project())
        md = {"summary": dg.MetadataValue.md(s.table_md)}
        for name, png in s.plots.items():
            md[name] = dg.MetadataValue.md(markdown_image(png, name))
        return dg.MaterializeResult(metadata=md)

    return [sae, sae_metrics], []
