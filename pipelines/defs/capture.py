"""Capture assets: the Zarr store, its shards (one partition each) and the `samples` table."""

import dagster as dg

from pipelines.defs.automation import up_to_date
from pipelines.defs.resources import TideResource
from pipelines.defs.versions import code_version
from pipelines.plots import image_grid, markdown_image, png_bytes_of_array
from pipelines.project import Project

GROUP = "capture"


def build(project: Project, model: list[dg.AssetsDefinition], judge: dg.AssetsDefinition | None) -> tuple[list, list]:
    """Assets of the capture stage (after the model and, text-conditional, the prompts); shard partitions
    come from the config."""
    cfg = project.config
    shards = dg.StaticPartitionsDefinition(project.shard_keys())

    @dg.asset(group_name=GROUP, deps=model, kinds={"zarr"}, code_version=code_version("activation_store", cfg),
              automation_condition=up_to_date())
    def activation_store(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
        """Creates the store's arrays once, upstream of the shard writers (or checks that an existing store
        was written with this config). Its data version is the store's run and creation time."""
        from pipelines.stages.capture import create_store, store_version

        store = create_store(tide.context(context))
        lay = store.layout
        return dg.MaterializeResult(data_version=dg.DataVersion(store_version(store)), metadata={
            "url": store.url, "run_id": store.provenance["run_id"], "num_shards": lay.num_shards,
            "layout": dg.MetadataValue.json({k: getattr(lay, k) for k in (
                "num_samples", "shard_size", "layers", "sites", "tokens_stored", "tokens_total", "d_model",
                "acts_from_shard")}),
            "bytes_per_sample": lay.act_bytes_per_sample(),
            "raw_bytes_total": lay.act_bytes_per_sample() * len(lay.act_samples),
        })

    @dg.asset(group_name=GROUP, deps=[activation_store], partitions_def=shards, kinds={"zarr", "pytorch"},
              code_version=code_version("activations", cfg), automation_condition=up_to_date())
    def activations(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
        """One shard of samples: images, class ids, seeds and the captured activations, marked done last.
        Deterministic: a shard written again holds the same bits, so it keeps its data version."""
        from pipelines.stages.capture import write_shard

        shard = int(context.partition_key)
        report = write_shard(tide.context(context), shard)
        s = report.stats
        n = len(report.images)
        cols, rows = min(16, n), max(1, min(4, n // min(16, n)))
        grid = png_bytes_of_array(image_grid(report.images[: cols * rows], rows=rows, cols=cols))
        context.log.info(f"shard {shard}: {s.samples} samples, {s.raw_bytes / 1e6:.1f} MB in {s.seconds:.1f}s")
        return dg.MaterializeResult(data_version=dg.DataVersion(f"{report.store_version}#{shard}"), metadata={
            "reused": report.reused, "samples": s.samples, "bytes_written": s.raw_bytes, "bytes_stored": report.stored_bytes,
            "compression_ratio": dg.MetadataValue.float(round(report.compression_ratio, 3)),
            "seconds": s.seconds, "MB_per_s": round(s.raw_bytes / 1e6 / max(s.seconds, 1e-9), 1),
            "images": dg.MetadataValue.md(markdown_image(grid, "samples")),
        })

    @dg.asset(group_name=GROUP, deps=[activations, *([judge] if judge is not None else [])], kinds={"duckdb"},
              pool="tide_duckdb", code_version=code_version("samples", cfg), automation_condition=up_to_date())
    def samples(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
        """The `samples` and `runs` tables: one row per generated image, with the judge's verdict."""
        from pipelines.stages.samples import publish_samples

        ctx = tide.context(context)
        out = publish_samples(ctx)
        return dg.MaterializeResult(data_version=dg.DataVersion(out.store_version), metadata={
            "rows": out.rows, "run_id": out.run_id, "duckdb": str(ctx.project.duckdb_path),
            "judge_accuracy": dg.MetadataValue.float(out.judge_accuracy) if out.judge_accuracy is not None
            else dg.MetadataValue.text("no judge for this model family"),
        })

    # The store's checks hang on `samples`, the first asset after the shards: a check on the partitioned
    # asset would fail until its last partition is done. They run with it and on their own from the UI.
    @dg.asset_check(asset=samples, description="every shard of the store has its done marker")
    def shards_complete(context: dg.AssetCheckExecutionContext, tide: TideResource) -> dg.AssetCheckResult:
        missing = tide.context(context).store().missing_shards()
        return dg.AssetCheckResult(passed=not missing, metadata={"missing_shards": str(missing)})

    @dg.asset_check(asset=samples, description="all stored activations are finite")
    def activations_finite(context: dg.AssetCheckExecutionContext, tide: TideResource) -> dg.AssetCheckResult:
        from pipelines.stages.samples import count_nonfinite

        bad = count_nonfinite(tide.context(context))
        return dg.AssetCheckResult(passed=sum(bad.values()) == 0, metadata={"nonfinite": str(bad)})

    @dg.asset_check(asset=samples, description="array shapes match the provenance in zarr.json")
    def shapes_match_provenance(context: dg.AssetCheckExecutionContext, tide: TideResource) -> dg.AssetCheckResult:
        from pipelines.stages.samples import shape_problems

        problems = shape_problems(tide.context(context))
        return dg.AssetCheckResult(passed=not problems, metadata={"problems": str(problems or "none")})

    return [activation_store, activations, samples], [shards_complete, activations_finite, shapes_match_provenance]
