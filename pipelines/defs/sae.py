"""SAE assets: one partition per captured (layer, site) trains every variant; `sae_metrics` compares them."""

import dagster as dg

from pipelines.defs.automation import up_to_date
from pipelines.defs.resources import TideResource
from pipelines.defs.versions import code_version
from pipelines.plots import line_plot, markdown_image
from pipelines.project import Project
from storage.schema import MAX_DEAD_FRACTION

GROUP = "sae"
MIN_EXPLAINED_VARIANCE = 0.90


def layer_sites(project: Project) -> dg.MultiPartitionsDefinition:
    """The partitions of every per-SAE asset: captured layer x captured site (keys like "03|resid")."""
    c = project.config.capture
    return dg.MultiPartitionsDefinition({"layer": dg.StaticPartitionsDefinition(project.layer_keys()),
                                         "site": dg.StaticPartitionsDefinition(list(c.sites))})


def layer_site(context: dg.AssetExecutionContext) -> tuple[int, str]:
    keys = context.partition_key.keys_by_dimension
    return int(keys["layer"]), keys["site"]


def build(project: Project, samples: dg.AssetsDefinition) -> tuple[list, list]:
    cfg = project.config
    variants = cfg.sae.variants
    specs = [dg.AssetCheckSpec(name=f"{v}_explained_variance", asset="sae",
                               description=f"held-out explained variance of the {v} SAE >= {MIN_EXPLAINED_VARIANCE}")
             for v in variants]
    specs += [dg.AssetCheckSpec(name=f"{v}_dead_fraction", asset="sae",
                                description=f"dead latents of the {v} SAE < {MAX_DEAD_FRACTION:.0%}") for v in variants]

    @dg.asset(group_name=GROUP, deps=[samples], partitions_def=layer_sites(project), check_specs=specs,
              # no pool: layers train in parallel (tide run --workers); their DuckDB writes are short
              # transactions that retry while another writer holds the file
              kinds={"pytorch", "safetensors"}, code_version=code_version("sae", cfg),
              automation_condition=up_to_date())
    def sae(context: dg.AssetExecutionContext, tide: TideResource):
        """Every configured SAE variant of one (layer, site), trained from one pass over the store, evaluated
        per step on train and held-out samples and spliced into the DiT; rows in saes / sae_metrics /
        sae_splice. A killed partition resumes from its last training checkpoint."""
        from pipelines.stages.sae import train_layer

        layer, site = layer_site(context)
        report = train_layer(tide.context(context), layer, site)
        md: dict = {"resumed_from_tokens": report.resumed_from, "samples_drawn": report.samples_drawn}
        for r in report.reports:
            h = r.metrics["heldout"][-1]
            md[f"{r.variant}_heldout"] = dg.MetadataValue.json({k: round(v, 5) for k, v in h.items()})
            md[f"{r.variant}_sae_id"] = r.sae_id
            if r.splice:
                md[f"{r.variant}_spliced"] = dg.MetadataValue.json(
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in vars(r.splice).items()})
        for key, label in (("nmse", "normalised MSE"), ("l0", "L0")):
            series = {}
            for r in report.reports:
                per = {s: m for s, m in r.metrics["heldout"].items() if s >= 0}
                steps = sorted(per)
                series[r.variant] = (steps, [per[s][key] for s in steps])
            png = line_plot(series, "step (0 = noisiest)", label, f"layer {layer} {site}, held-out")
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

    @dg.asset(group_name=GROUP, deps=[sae], kinds={"duckdb"}, code_version=code_version("sae_metrics", cfg),
              automation_condition=up_to_date())
    def sae_metrics(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
        """Per-step comparison of the variants across layers and sites (reads v_sae_metrics)."""
        from pipelines.stages.sae_report import summarise

        s = summarise(tide.context(context))
        md = {"summary": dg.MetadataValue.md(s.table_md)}
        for name, png in s.plots.items():
            md[name] = dg.MetadataValue.md(markdown_image(png, name))
        return dg.MaterializeResult(metadata=md)

    assets = [sae, sae_metrics]
    if cfg.sweep is not None:
        assets.append(_sweep_asset(project, samples))
    return assets, []


def _sweep_asset(project: Project, samples: dg.AssetsDefinition) -> dg.AssetsDefinition:
    cfg = project.config
    points = dg.StaticPartitionsDefinition([p.key for p in cfg.sweep.points(cfg.sae)])

    @dg.asset(group_name=GROUP, deps=[samples], partitions_def=points, kinds={"pytorch", "duckdb"},
              pool="tide_duckdb", code_version=code_version("sae_sweep", cfg), automation_condition=up_to_date())
    def sae_sweep(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
        """One point of the [sweep] grid (lr x batch size x k x width) on one layer and site: every variant
        trained there and scored per step on the held-out samples; rows in sae_sweep, best points in
        v_sae_sweep_best."""
        from pipelines.stages.sae_sweep import run_point

        r = run_point(tide.context(context), context.partition_key)
        return dg.MaterializeResult(metadata={
            "sweep_id": r.sweep_id, "seconds": round(r.seconds, 1), "tokens": r.tokens,
            **{f"{v}_heldout_nmse": round(x, 5) for v, x in r.nmse.items()}})

    return sae_sweep
