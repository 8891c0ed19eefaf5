"""Editing stage: the `edits` asset renders the `[edit]` grid (same seeds before and after each edit)."""

import dagster as dg

from pipelines.plots import markdown_image
from pipelines.resources import TideResource

GROUP = "edit"


def build(deps: list) -> tuple[list, list]:
    @dg.asset(group_name=GROUP, deps=deps, kinds={"pytorch", "duckdb"}, pool="tide_duckdb",
              check_specs=[dg.AssetCheckSpec(name="edits_grain", asset="edits",
                                             description="one `edits` row per (edit_id, sample_id)")])
    def edits(context: dg.AssetExecutionContext, tide: TideResource):
        """Held-out samples regenerated under the configured feature edit ([edit]: SAE, op, features picked
        by class, strengths x step windows), judged before and after; a grid PNG and rows in `edits`."""
        from pipelines.edit_ops import run_configured_edits, summary_markdown
        from storage.warehouse import Warehouse

        project = tide.project()
        report = run_configured_edits(project, log=context.log.info)
        yield dg.MaterializeResult(metadata={
            "sae_id": report.plan.target.sae_id,
            "feature_ids": dg.MetadataValue.json(report.plan.feature_ids),
            "target_class": report.plan.target_class,
            "sample_ids": dg.MetadataValue.json([int(i) for i in report.plan.sample_ids]),
            "summary": dg.MetadataValue.md(summary_markdown(report.summaries)),
            "grid_path": str(report.grid_path),
            "grid": dg.MetadataValue.md(markdown_image(report.grid_png, "edits")),
        })
        extra = Warehouse(project.duckdb_path).check_grain("edits")
        yield dg.AssetCheckResult(check_name="edits_grain", passed=extra == 0, metadata={"extra_rows": extra})

    return [edits], []
