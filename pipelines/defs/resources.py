"""The Dagster resource that hands assets a run context for the config in force."""

from functools import lru_cache

import dagster as dg

from pipelines.context import RunContext
from pipelines.project import Project


@lru_cache(maxsize=8)
def _load(path: str) -> Project:
    return Project.load(path or None)


class TideResource(dg.ConfigurableResource):
    """The run config (tide.toml, or the file named by --config / $TIDE_CONFIG)."""

    config_path: str = ""

    def project(self) -> Project:
        return _load(self.config_path)

    def context(self, context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> RunContext:
        """A fresh run context whose log is the step's Dagster log."""
        return RunContext(self.project(), log=context.log.info)
