"""The Dagster resource that hands assets the validated config and its paths."""

from __future__ import annotations

from functools import lru_cache

import dagster as dg

from pipelines.project import Project


@lru_cache(maxsize=8)
def _load(path: str) -> Project:
    return Project.load(path or None)


class TideResource(dg.ConfigurableResource):
    """The run config (tide.toml, or the file named by --config / $TIDE_CONFIG)."""

    config_path: str = ""

    def project(self) -> Project:
        return _load(self.config_path)
