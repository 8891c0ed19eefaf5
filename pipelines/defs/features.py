"""Feature assets: statistics and top-activating images per (layer, site), in the DuckDB warehouse."""

import dagster as dg

from pipelines.defs.automation import up_to_date
from pipelines.defs.resources import TideResource
from pipelines.defs.sae import layer_site
from pipelines.defs.versions import code_version
from pipelines.plots import line_plot, markdown_image
from pipelines.project import Project

GROUP = "features"
STATS_CHECKS = ("grains_unique", "rates_in_unit_interval")
TOP_CHECKS = ("grain_unique", "ranks_dense_and_sorted", "live_features_have_images")


def _step_plots(ctx, layer: int, site: str) -> dict[str, dg.MetadataValue]:
    """Live features and mean class selectivity against step, one line per SAE variant."""
    rows = ctx.warehouse.query(
        "SELECT variant, step, count(*) FILTER (WHERE fire_rate > 0) AS live, avg(class_selectivity) AS sel "
        "FROM v_feature_stats WHERE layer = ? AND site = ? GROUP BY ALL ORDER BY variant, step",
        [layer, site]).to_pylist()
    md = {}
    for key, label in (("live", "live features"), ("sel", "mean class selectivity")):
        series: dict[str, tuple[list, list]] = {}
        for r in rows:
            xs, ys = series.setdefault(r["variant"], ([], []))
            xs.append(r["step"])
            ys.append(r[key])
        png = line_plot(series, "step (0 = noisiest)", label, f"layer {layer} {site}")
        md[f"{key}_by_step"] = dg.MetadataValue.md(markdown_image(png, label))
    return md


def build(project: Project, sae: dg.AssetsDefinition) -> tuple[list, list]:
    cfg = project.config
    stats_specs = [dg.AssetCheckSpec(name=n, asset="feature_stats") for n in STATS_CHECKS]
    top_specs = [dg.AssetCheckSpec(name=n, asset="top_images") for n in TOP_CHECKS]

    @dg.asset(group_name=GROUP, deps=[sae], partitions_def=sae.partitions_def, check_specs=stats_specs,
              kinds={"dask", "duckdb"}, pool="tide_duckdb", code_version=code_version("feature_stats", cfg),
              automation_condition=up_to_date())
    def feature_stats(context: dg.AssetExecutionContext, tide: TideResource):
        """One dask pass per SAE of the (layer, site) over the stored activations: per-step, per-class and
        overall statistics of every feature (feature_stats, features, feature_concepts) and decoder
        neighbours."""
        from pipelines.stages.features import build_feature_stats, check_feature_stats

        ctx = tide.context(context)
        layer, site = layer_site(context)
        report = build_feature_stats(ctx, layer, site)
        md = {f"{r.variant}_live_features": f"{r.live}/{r.n_latents}" for r in report.saes}
        md.update({f"{r.variant}_tokens_per_s": round(r.tokens_per_s) for r in report.saes})
        md.update(_step_plots(ctx, layer, site))
        yield dg.MaterializeResult(metadata=md)
        for name, out in check_feature_stats(ctx, [r.sae_id for r in report.saes]).items():
            yield dg.AssetCheckResult(check_name=name, passed=out.passed, description=out.description,
                                      metadata=out.metadata)

    @dg.asset(group_name=GROUP, deps=[feature_stats], partitions_def=sae.partitions_def, check_specs=top_specs,
              kinds={"duckdb"}, pool="tide_duckdb", code_version=code_version("top_images", cfg),
              automation_condition=up_to_date())
    def top_images(context: dg.AssetExecutionContext, tide: TideResource):
        """The top images of every feature (overall, and at its peak step) with patch heatmaps over the full
        token grid (recomputed by re-sampling where capture kept a subset of tokens)."""
        from pipelines.stages.top_images import build_top_images, check_top_images

        ctx = tide.context(context)
        written = build_top_images(ctx, *layer_site(context))
        yield dg.MaterializeResult(metadata={"rows": dg.MetadataValue.json(written)})
        for name, out in check_top_images(ctx, list(written)).items():
            yield dg.AssetCheckResult(check_name=name, passed=out.passed, description=out.description,
                                      metadata=out.metadata)

    return [feature_stats, top_images], []
