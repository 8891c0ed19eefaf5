"""Dagster definitions by stage (this package is the only one importing dagster). Each module builds its
assets for a project, because partitions (shards, layers, sites) and code versions come from the config;
nothing here imports torch: the stages they run are imported inside the asset bodies. The asset modules do
not use ``from __future__ import annotations``: Dagster reads their ``context`` annotations at definition
time."""

from __future__ import annotations

import dagster as dg

from pipelines.defs import capture, dashboard, edit, features, model, sae
from pipelines.defs.automation import automation_sensor
from pipelines.defs.resources import TideResource
from pipelines.project import Project


def build(project: Project, has_judge: bool, text: bool) -> dg.Definitions:
    """Every asset, check and the automation sensor of one project. The order of the stages is the asset
    graph's alone: `tide run` and the automation sensor both read it from here."""
    model_assets, model_checks = model.build(project, has_judge, text)
    by_name = {a.key.to_user_string(): a for a in model_assets}
    dit_model, judge, prompts = by_name["dit_model"], by_name.get("judge"), by_name.get("prompts")
    cap_assets, cap_checks = capture.build(project, [dit_model, *([prompts] if prompts else [])], judge)
    sae_assets, sae_checks = sae.build(project, cap_assets[2])
    feature_assets, feature_checks = features.build(project, sae_assets[0])
    edit_assets, edit_checks = edit.build(project, [feature_assets[1], dit_model, *([judge] if judge else [])])
    dash_assets, dash_checks = dashboard.build(project, [feature_assets[1], sae_assets[1], *edit_assets])
    return dg.Definitions(
        assets=[*model_assets, *cap_assets, *sae_assets, *feature_assets, *edit_assets, *dash_assets],
        asset_checks=[*model_checks, *cap_checks, *sae_checks, *feature_checks, *edit_checks, *dash_checks],
        sensors=[automation_sensor()],
        resources={"tide": TideResource(config_path=str(project.config_path or ""))},
    )
