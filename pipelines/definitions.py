"""The Dagster code location: every asset of the config in force (tide.toml, or $TIDE_CONFIG).

Partitions and code versions depend on the config, so the definitions are built from it; `tide run` and
tests build them for a given file. Loading them imports no torch (every module here is imported at each
Dagster load).
"""

from __future__ import annotations

import os

import dagster as dg

from pipelines.defs import build
from pipelines.project import Project
from tide_core.config import CONFIG_ENV
from tide_core.models.registry import family_entry


def build_definitions(config_path: str | None = None) -> dg.Definitions:
    path = config_path if config_path is not None else os.environ.get(CONFIG_ENV, "")
    project = Project.load(path or None)
    return definitions_for(project)


def definitions_for(project: Project) -> dg.Definitions:
    family = family_entry(project.config.model)
    return build(project, has_judge=family.has_judge, text=family.text)


defs = build_definitions()
