"""The Dagster code location: assets, checks, jobs, the daily schedule and the sensors that chain jobs.

Partitions (shards, layers) depend on the config, so definitions are built from the config in force
(tide.toml, or $TIDE_CONFIG); `tide run` and tests build them for a given file.
"""


import os

import dagster as dg

from pipelines.assets import capture, model, sae
from pipelines.project import Project
from pipelines.resources import TideResource
from tide_core.config import CONFIG_ENV

MODEL_JOB = "tide_model_job"
CAPTURE_JOB = "tide_capture_job"
PUBLISH_JOB = "tide_publish_job"
SAE_JOB = "tide_sae_job"
REPORT_JOB = "tide_report_job"


def build_definitions(config_path: str | None = None) -> dg.Definitions:
    path = config_path if config_path is not None else os.environ.get(CONFIG_ENV, "")
    project = Project.load(path or None)
    cap_assets, cap_checks = capture.build(project)
    store_asset, activations, samples = cap_assets
    sae_assets, sae_checks = sae.build(project, samples)
    sae_asset, sae_metrics = sae_assets

    model_job = dg.define_asset_job(MODEL_JOB, selection=dg.AssetSelection.assets(*model.ASSETS, store_asset),
                                    description="Digits, DiT, judge, sample quality; creates the store.")
    capture_job = dg.define_asset_job(CAPTURE_JOB, selection=dg.AssetSelection.assets(activations),
                                      partitions_def=activations.partitions_def,
                                      description="Samples one shard with capture into the Zarr store.")
    publish_job = dg.define_asset_job(PUBLISH_JOB, selection=dg.AssetSelection.assets(samples),
                                      description="Publishes the samples table once every shard is done.")

    sae_job = dg.define_asset_job(SAE_JOB, selection=dg.AssetSelection.assets(sae_asset),
                                  partitions_def=sae_asset.partitions_def,
                                  description="Trains every SAE variant of one layer (one partition per layer).")
    report_job = dg.define_asset_job(REPORT_JOB, selection=dg.AssetSelection.assets(sae_metrics),
                                     description="Cross-layer SAE comparison once every layer is trained.")

    daily = dg.ScheduleDefinition(name="daily_tide_pipeline", job=model_job, cron_schedule="0 3 * * *",
                                  default_status=dg.DefaultScheduleStatus.STOPPED,
                                  description="Re-runs the pipeline daily; turn on the two sensors as well.")

    @dg.asset_sensor(asset_key=store_asset.key, job=capture_job, default_status=dg.DefaultSensorStatus.STOPPED)
    def shards_after_store(context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry):
        """Requests every shard partition once the store has been (re)created."""
        for key in activations.partitions_def.get_partition_keys():
            yield dg.RunRequest(run_key=f"{asset_event.storage_id}-{key}", partition_key=key)

    @dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, monitored_jobs=[capture_job],
                          request_job=publish_job, default_status=dg.DefaultSensorStatus.STOPPED)
    def publish_after_shards(context: dg.RunStatusSensorContext):
        """Publishes once the last shard is done (earlier shard successes find shards missing)."""
        from pipelines.capture_ops import open_store

        store = open_store(project)
        if not store.missing_shards():
            return dg.RunRequest(run_key=f"publish-{store.provenance['run_id']}-{context.dagster_run.run_id}")
        return dg.SkipReason(f"shards still missing: {store.missing_shards()[:10]}")

    @dg.asset_sensor(asset_key=samples.key, job=sae_job, default_status=dg.DefaultSensorStatus.STOPPED)
    def saes_after_samples(context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry):
        """Requests every layer partition of `sae` once the samples table is published."""
        for key in sae_asset.partitions_def.get_partition_keys():
            yield dg.RunRequest(run_key=f"{asset_event.storage_id}-{key}", partition_key=key)

    @dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, monitored_jobs=[sae_job],
                          request_job=report_job, default_status=dg.DefaultSensorStatus.STOPPED)
    def report_after_saes(context: dg.RunStatusSensorContext):
        """Summarises once every layer partition of `sae` has a materialization."""
        done = context.instance.get_materialized_partitions(sae_asset.key)
        missing = set(sae_asset.partitions_def.get_partition_keys()) - set(done)
        if missing:
            return dg.SkipReason(f"layers still training: {sorted(missing)}")
        return dg.RunRequest(run_key=f"report-{context.dagster_run.run_id}")

    return dg.Definitions(
        assets=[*model.ASSETS, *cap_assets, *sae_assets],
        asset_checks=[*model.CHECKS, *cap_checks, *sae_checks],
        jobs=[model_job, capture_job, publish_job, sae_job, report_job],
        schedules=[daily],
        sensors=[shards_after_store, publish_after_shards, saes_after_samples, report_after_saes],
        resources={"tide": TideResource(config_path=str(project.config_path or ""))},
    )


defs = build_definitions()
