"""The Dagster instance of a warehouse: ``<warehouse root>/.dagster``.

Each warehouse (each config's root) keeps its own runs, materializations and data versions beside the data
they describe, so runs of two configs never mix, `tide ui --config X` shows X's runs, and deleting a
warehouse deletes its history with it. Tests use temporary roots, hence temporary instances.
"""

from __future__ import annotations

import dagster as dg

from pipelines.project import Project

# telemetry and the first-run pop-up off; one run at a time in the `tide_duckdb` pool (the assets that
# write the DuckDB file), because DuckDB admits one writing process at a time.
DAGSTER_YAML = """\
telemetry:
  enabled: false
nux:
  enabled: false
concurrency:
  pools:
    default_limit: 1
"""


def ensure_home(project: Project) -> str:
    """Create the instance folder and its dagster.yaml (once); returns the folder."""
    home = project.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    yaml = home / "dagster.yaml"
    if not yaml.exists():
        yaml.write_text(DAGSTER_YAML)
    return str(home)


def warehouse_instance(project: Project) -> dg.DagsterInstance:
    """The warehouse's persistent instance (created on first use)."""
    return dg.DagsterInstance.from_config(ensure_home(project))
