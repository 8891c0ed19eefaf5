"""Capture stage: the Zarr store, its shards (one partition each) and the samples table."""


import dagster as dg

from pipelines import capture_ops
from pipelines.assets.model import digit_classifier, dit_model
from pipelines.plots import image_grid, markdown_image, png_bytes_of_array
from pipelines.project import Project
from pipelines.resources import TideResource

GROUP = "capture"


def build(project: Project) -> tuple[list, list]:
    """Assets and checks of the capture stage; shard partitions come from the config."""
    shards = dg.StaticPartitionsDefinition(project.shard_keys())

    @dg.asset(group_name=GROUP, deps=[dit_model], kinds={"zarr"})
    def activation_store(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
        """Creates the store's arrays once, upstream of the shard writers (or checks that an existing
        store was written with this config)."""
        store = capture_ops.create_store(tide.project())
        lay = store.layout
        return dg.MaterializeResult(metadata={
            "url": store.url, "run_id": store.provenance["run_id"], "num_shards": lay.num_shards,
            "layout": dg.MetadataValue.json({k: getattr(lay, k) for k in (
                "num_samples", "shard_size", "layers", "sites", "tokens_stored", "tokens_total", "d_model")}),
            "bytes_per_sample": lay.act_bytes_per_sample(),
            "raw_bytes_total": lay.act_bytes_per_sample() * lay.num_samples,
        })

    @dg.asset(group_name=GROUP, deps=[activation_store], partitions_def=shards, kinds={"zarr", "pytorch"})
    def activations(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
        """One shard of samples: images, class ids, seeds and the captured activations, marked done last."""
        shard = int(context.partition_key)
        report = capture_ops.write_shard(tide.project(), shard)
        s = report.stats
        n = len(report.images)
        cols = min(16, n)
        grid = png_bytes_of_array(image_grid(report.images[: cols * max(1, min(4, n // cols))],
                                             rows=max(1, min(4, n // cols)), cols=cols))
        context.log.info(f"shard {shard}: {s.samples} samples, {s.raw_bytes / 1e6:.1f} MB in {s.seconds:.1f}s")
        return dg.MaterializeResult(metadata={
            "samples": s.samples, "bytes_written": s.raw_bytes, "bytes_stored": report.stored_bytes,
            "compression_ratio": dg.MetadataValue.float(round(report.compression_ratio, 3)),
            "seconds": s.seconds, "MB_per_s": round(s.raw_bytes / 1e6 / max(s.seconds, 1e-9), 1),
            "images": dg.MetadataValue.md(markdown_image(grid, "samples")),
        })

    @dg.asset(group_name=GROUP, deps=[activations, digit_classifier], kinds={"duckdb"}, pool="tide_duckdb")
    def samples(context: dg.AssetExecutionContext, tide: TideResource) -> dg.MaterializeResult:
        """The `samples` and `runs` tables: one row per generated image, with the judge's verdict."""
        out = capture_ops.publish_samples(tide.project())
        return dg.MaterializeResult(metadata={
            "rows": out.rows, "run_id": out.run_id, "duckdb": str(out.path),
            "judge_accuracy": dg.MetadataValue.float(out.judge_accuracy) if out.judge_accuracy is not None
            else dg.MetadataValue.text("n/a"),
        })

    @dg.asset_check(asset=samples, description="every shard of the store has its done marker")
    def shards_complete(tide: TideResource) -> dg.AssetCheckResult:
        missing = capture_ops.open_store(tide.project()).missing_shards()
        return dg.AssetCheckResult(passed=not missing, metadata={"missing_shards": str(missing)})

    @dg.asset_check(asset=samples, description="all stored activations are finite")
    def activations_finite(tide: TideResource) -> dg.AssetCheckResult:
        bad = capture_ops.count_nonfinite(tide.project())
        return dg.AssetCheckResult(passed=sum(bad.values()) == 0, metadata={"nonfinite": str(bad)})

    @dg.asset_check(asset=samples, description="array shapes match the provenance in zarr.json")
    def shapes_match_provenance(tide: TideResource) -> dg.AssetCheckResult:
        problems = capture_ops.shape_problems(tide.project())
        return dg.AssetCheckResult(passed=not problems, metadata={"problems": str(problems or "none")})

    return [activation_store, activations, samples], [shards_complete, activations_finite,
                                                      shapes_match_provenance]
