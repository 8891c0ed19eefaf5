"""Feature stage: statistics and top-activating images per layer, in the DuckDB warehouse."""

import dagster as dg

from pipelines.plots import line_plot, markdown_image
from pipelines.project import Project
from pipelines.resources import TideResource

GROUP = "features"
STATS_CHECKS = ("grains_unique", "rates_in_unit_interval")
TOP_CHECKS = ("grain_unique", "ranks_dense_and_sorted", "live_features_have_images")


def _step_plots(project: Project, layer: int) -> dict[str, dg.MetadataValue]:
    """Live features and mean class selectivity against step, one line per SAE variant."""
    from storage.warehouse import Warehouse

    rows = Warehouse(project.duckdb_path).query(
        "SELECT variant, step, count(*) FILTER (WHERE fire_rate > 0) AS live, avg(class_selectivity) AS sel "
        "FROM v_feature_stats WHERE layer = ? GROUP BY ALL ORDER BY variant, step", [layer]).to_pylist()
    md = {}
    for key, label in (("live", "live features"), ("sel", "mean class selectivity")):
        series: dict[str, tuple[list, list]] = {}
        for r in rows:
            xs, ys = series.setdefault(r["variant"], ([], []))
            xs.append(r["step"])
            ys.append(r[key])
        png = line_plot(series, "step (0 = noisiest)", label, f"layer {layer}")
        md[f"{key}_by_step"] = dg.MetadataValue.md(markdown_image(png, label))
    return md


def build(project: Project, sae_asset: dg.AssetsDefinition) -> tuple[list, list]:
    layers = sae_asset.partitions_def
    stats_specs = [dg.AssetCheckSpec(name=n, asset="feature_stats") for n in STATS_CHECKS]
    top_specs = [dg.AssetCheckSpec(name=n, asset="top_images") for n in TOP_CHECKS]

    @dg.asset(group_name=GROUP, deps=[sae_asset], partitions_def=layers, check_specs=stats_specs,
              kinds={"dask", "duckdb"}, pool="tide_duckdb")
    def feature_stats(context: dg.AssetExecutionContext, tide: TideResource):
        """One dask pass per SAE of the layer over the stored activations: per-step, per-class and overall
        statistics of every feature (feature_stats, features, feature_classes) and decoder neighbours."""
        from pipelines.feature_ops import build_feature_stats, check_feature_stats

        project = tide.project()
        layer = int(context.partition_key)
        report = build_feature_stats(project, layer, log=context.log.info)
        md = {f"{r.variant}_live_features": f"{r.live}/{r.n_latents}" for r in report.saes}
        md.update({f"{r.variant}_tokens_per_s": round(r.tokens_per_s) if r.tokens_per_s is not None
                   else "reused: statistics on record for this SAE and settings" for r in report.saes})
        md.update(_step_plots(project, layer))
        yield dg.MaterializeResult(metadata=md)
        for name, out in check_feature_stats(project, [r.sae_id for r in report.saes]).items():
            yield dg.AssetCheckResult(check_name=name, passed=out.passed, description=out.description,
                                      metadata=out.metadata)

    @dg.asset(group_name=GROUP, deps=[feature_stats], partitions_def=layers, check_specs=top_specs,
              kinds={"duckdb"}, pool="tide_duckdb")
    def top_images(context: dg.AssetExecutionContext, tide: TideResource):
        """The top images of every feature (overall, and at its peak step) with patch heatmaps over the full
        token grid (recomputed by re-sampling where capture kept a subset of tokens)."""
        from pipelines.feature_ops import build_top_images, check_top_images

        project = tide.project()
        layer = int(context.partition_key)
        written = build_top_images(project, layer, log=context.log.info)
        yield dg.MaterializeResult(metadata={"rows": dg.MetadataValue.json(written)})
        for name, out in check_top_images(project, list(written)).items():
            yield dg.AssetCheckResult(check_name=name, passed=out.passed, description=out.description,
                                      metadata=out.metadata)

    return [feature_stats, top_images], []
