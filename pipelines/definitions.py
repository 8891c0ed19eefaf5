"""The Dagster code location: assets, checks, jobs, the daily schedule and the sensors that chain jobs.

Partitions (shards, layers) depend on the config, so definitions are built from the config in force
(tide.toml, or $TIDE_CONFIG); `tide run` and tests build them for a given file.
"""


import os

import dagster as dg

from pipelines.assets import capture, dashboard, edit, features, model, sae
from pipelines.project import Project
from pipelines.resources import TideResource
from tide_core.config import CONFIG_ENV

MODEL_JOB = "tide_model_job"
CAPTURE_JOB = "tide_capture_job"
PUBLISH_JOB = "tide_publish_job"
SAE_JOB = "tide_sae_job"
REPORT_JOB = "tide_report_job"
FEATURES_JOB = "tide_features_job"
DASHBOARD_JOB = "tide_dashboard_job"
EDIT_JOB = "tide_edit_job"


def fan_out(name: str, upstream: dg.AssetsDefinition, job, partitioned: dg.AssetsDefinition):
    """A sensor (off by default) requesting every partition of `job` when `upstream` materializes."""

    @dg.asset_sensor(name=name, asset_key=upstream.key, job=job, default_status=dg.DefaultSensorStatus.STOPPED,
                     description=f"Requests every partition of {partitioned.key.to_user_string()} after "
                                 f"{upstream.key.to_user_string()} materializes.")
    def _sensor(context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry):
        for key in partitioned.partitions_def.get_partition_keys():
            yield dg.RunRequest(run_key=f"{asset_event.storage_id}-{key}", partition_key=key)

    return _sensor


def join(name: str, monitored, partitioned: dg.AssetsDefinition, request_job):
    """A sensor (off by default) requesting `request_job` once every partition of `partitioned` exists."""

    @dg.run_status_sensor(name=name, run_status=dg.DagsterRunStatus.SUCCESS, monitored_jobs=[monitored],
                          request_job=request_job, default_status=dg.DefaultSensorStatus.STOPPED,
                          description=f"Runs {request_job.name} once every partition of "
                                      f"{partitioned.key.to_user_string()} is materialized.")
    def _sensor(context: dg.RunStatusSensorContext):
        done = context.instance.get_materialized_partitions(partitioned.key)
        missing = sorted(set(partitioned.partitions_def.get_partition_keys()) - set(done))
        if missing:
            return dg.SkipReason(f"partitions still missing: {missing[:10]}")
        return dg.RunRequest(run_key=f"{name}-{context.dagster_run.run_id}")

    return _sensor


def build_definitions(config_path: str | None = None) -> dg.Definitions:
    path = config_path if config_path is not None else os.environ.get(CONFIG_ENV, "")
    project = Project.load(path or None)
    cap_assets, cap_checks = capture.build(project)
    store_asset, activations, samples = cap_assets
    sae_assets, sae_checks = sae.build(project, samples)
    sae_asset, sae_metrics = sae_assets
    feature_assets, feature_checks = features.build(project, sae_asset)
    feature_stats, top_images = feature_assets
    edit_assets, edit_checks = edit.build([feature_stats, model.dit_model, model.digit_classifier])
    dashboard_assets, dashboard_checks = dashboard.build(project, [top_images, *edit_assets])

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

    features_job = dg.define_asset_job(FEATURES_JOB, selection=dg.AssetSelection.assets(feature_stats, top_images),
                                       partitions_def=feature_stats.partitions_def,
                                       description="Feature statistics and top images of one layer's SAEs.")
    dashboard_job = dg.define_asset_job(DASHBOARD_JOB, selection=dg.AssetSelection.assets(*dashboard_assets),
                                        description="Builds the feature browser site (serve it with `tide dashboard`).")
    edit_job = dg.define_asset_job(EDIT_JOB, selection=dg.AssetSelection.assets(*edit_assets),
                                   description="Before/after grid of the [edit] feature edit; rows in `edits`.")

    daily = dg.ScheduleDefinition(name="daily_tide_pipeline", job=model_job, cron_schedule="0 3 * * *",
                                  default_status=dg.DefaultScheduleStatus.STOPPED,
                                  description="Re-runs the pipeline daily; turn on the two sensors as well.")

    sensors = [
        fan_out("shards_after_store", store_asset, capture_job, activations),
        join("publish_after_shards", capture_job, activations, publish_job),
        fan_out("saes_after_samples", samples, sae_job, sae_asset),
        join("report_after_saes", sae_job, sae_asset, report_job),
        fan_out("features_after_report", sae_metrics, features_job, feature_stats),
        join("dashboard_after_features", features_job, top_images, dashboard_job),
    ]
    return dg.Definitions(
        assets=[*model.ASSETS, *cap_assets, *sae_assets, *feature_assets, *dashboard_assets, *edit_assets],
        asset_checks=[*model.CHECKS, *cap_checks, *sae_checks, *feature_checks, *dashboard_checks, *edit_checks],
        jobs=[model_job, capture_job, publish_job, sae_job, report_job, features_job, dashboard_job, edit_job],
        schedules=[daily],
        sensors=sensors,
        resources={"tide": TideResource(config_path=str(project.config_path or ""))},
    )


defs = build_definitions()
