"""Scheduled runs by declarative automation: one condition on every asset, evaluated by the automation
sensor (off by default; turn it on in the UI's Automation tab, with the daemon running: `tide ui` starts
one). The order comes from the asset graph alone: an asset is requested once its dependencies are there.

An asset partition is requested when it is missing (and its last attempt did not fail), when its code
version (its stage revision or its config fields) changed, or when a dependency's data version changed;
never while a dependency is missing or in progress. The model, whose files live outside the warehouse, is
also re-read daily at 03:00 UTC: a new checkpoint gives it a new data version and everything downstream
follows; the same checkpoint gives the same version and nothing else runs.
"""

from __future__ import annotations

import os

import dagster as dg

DAILY = "0 3 * * *"
SENSOR = "tide_automation"
INTERVAL_ENV = "TIDE_AUTOMATION_INTERVAL_S"


def up_to_date() -> dg.AutomationCondition:
    AC = dg.AutomationCondition
    handled = (AC.newly_requested() | AC.newly_updated()).with_label("handled")
    changed = (AC.code_version_changed() | AC.any_deps_match(AC.data_version_changed())).since(handled)
    missing = (AC.missing() & ~AC.execution_failed()).with_label("missing, not failed")
    return ((missing | changed.with_label("code or input data changed"))
            & ~AC.any_deps_missing() & ~AC.any_deps_in_progress() & ~AC.in_progress()).with_label("up to date")


def daily_or_up_to_date() -> dg.AutomationCondition:
    AC = dg.AutomationCondition
    daily = AC.cron_tick_passed(DAILY).since_last_handled().with_label("daily re-read")
    return (up_to_date() | (daily & ~AC.in_progress())).with_label("up to date, re-read daily")


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    # Seconds between evaluations: Dagster's 30 unless TIDE_AUTOMATION_INTERVAL_S says otherwise (a test
    # waits for every wave of a tiny warehouse; a user rarely needs it)
    interval = int(os.environ.get(INTERVAL_ENV, "30"))
    return dg.AutomationConditionSensorDefinition(
        SENSOR, target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=interval,
        description="Keeps the warehouse up to date (missing, changed code or config, new upstream data); "
                    "re-reads the model daily. Off by default so it never races a `tide run`.")
