"""Editing asset: the `[edit]` grid (the same seeds before and after each edit) and its `edits` rows."""

import dagster as dg

from pipelines.defs.automation import up_to_date
from pipelines.defs.resources import TideResource
from pipelines.defs.versions import code_version
from pipelines.plots import markdown_image
from pipelines.project import Project

GROUP = "edit"


def build(project: Project, deps: list[dg.AssetsDefinition]) -> tuple[list, list]:
    @dg.asset(group_name=GROUP, deps=deps, kinds={"pytorch", "duckdb"}, pool="tide_duckdb",
              code_version=code_version("edits", project.config), automation_condition=up_to_date(),
              check_specs=[dg.AssetCheckSpec(name="edits_grain", asset="edits",
                                             description="one `edits` row per (edit_id, sample_id)")])
    def edits(context: dg.AssetExecutionContext, tide: TideResource):
        """Held-out samples regenerated under the configured feature edit ([edit]: SAE, op, features picked
        by class, strengths x step windows), judged before and after; a grid PNG and rows in `edits`."""
        from pipelines.stages.edit import run_configured_edits, summary_markdown

        ctx = tide.context(context)
        report = run_configured_edits(ctx)
        yield dg.MaterializeResult(metadata={
            "sae_id": report.plan.target.sae_id,
            "feature_ids": dg.MetadataValue.json(report.plan.feature_ids),
            "target_class": report.plan.target_class,
            "sample_ids": dg.MetadataValue.json([int(i) for i in report.plan.sample_ids]),
            "summary": dg.MetadataValue.md(summary_markdown(report.summaries)),
            "grid_path": str(report.grid_path),
            "grid": dg.MetadataValue.md(markdown_image(report.grid_png, "edits")),
        })
        extra = ctx.warehouse.check_grain("edits")
        yield dg.AssetCheckResult(check_name="edits_grain", passed=extra == 0, metadata={"extra_rows": extra})

    return [edits], []
