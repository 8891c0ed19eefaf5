"""Dashboard asset: the static feature browser, served by `tide dashboard`, with its key plots in the UI."""

import dagster as dg

from pipelines.defs.automation import up_to_date
from pipelines.defs.resources import TideResource
from pipelines.defs.versions import code_version
from pipelines.plots import markdown_image
from pipelines.project import Project

GROUP = "dashboard"


def build(project: Project, deps: list[dg.AssetsDefinition]) -> tuple[list, list]:
    checks = [dg.AssetCheckSpec(name="every_sae_has_pages", asset="feature_dashboard",
                                description="each SAE with feature rows has its feature list and detail files")]

    @dg.asset(group_name=GROUP, deps=deps, check_specs=checks, kinds={"html"}, pool="tide_duckdb",
              code_version=code_version("feature_dashboard", project.config), automation_condition=up_to_date())
    def feature_dashboard(context: dg.AssetExecutionContext, tide: TideResource):
        """The feature browser as a static site (overview, feature list per SAE, feature and sample pages)
        in <warehouse root>/dashboard; serve it with `tide dashboard`."""
        from pipelines.stages.dashboard import build_dashboard, key_plots

        report = build_dashboard(tide.context(context))
        md: dict = {
            "site": dg.MetadataValue.path(str(report.out_dir)),
            "serve_with": dg.MetadataValue.text("tide dashboard  (http://127.0.0.1:8050)"),
            "saes": report.n_saes, "features": report.n_features, "images": report.n_images,
            "files": report.n_files, "size_mb": round(report.bytes / 1e6, 2), "build_s": round(report.seconds, 1),
        }
        if report.warnings:
            md["warnings"] = dg.MetadataValue.md("\n".join(f"- {w}" for w in report.warnings))
        for name, png in key_plots(report).items():
            md[name] = dg.MetadataValue.md(markdown_image(png, name))
        yield dg.MaterializeResult(metadata=md)
        missing = [s.sae_id for s in report.saes if s.n_features and not
                   (report.out_dir / "data" / "sae" / s.slug / "features.json").exists()]
        yield dg.AssetCheckResult(check_name="every_sae_has_pages", passed=not missing,
                                  metadata={"missing": dg.MetadataValue.json(missing)})

    return [feature_dashboard], []
