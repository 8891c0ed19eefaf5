"""`tide run`: materialize the asset graph in its own dependency order, skipping what is up to date.

The order is the asset graph's topological order (``AssetGraph.toposorted_asset_keys``); nothing here names
a stage. Each asset partition that Dagster reports MISSING or STALE (a new code version, or a dependency
with a new data version: what the UI shows as stale, with its causes) is materialized in-process on the
warehouse's own instance, one run per asset partition, so every run appears in `tide ui`. FRESH partitions
are reused without running anything. The same graph drives the automation sensor (``defs.automation``).

Staleness is read with Dagster's ``CachingStaleStatusResolver``, the resolver the UI uses; it takes a
loading context, which outside a webserver is the minimal one below (Dagster's own is test-only).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import dagster as dg
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContext

from pipelines.killed_runs import owner_tag, release_killed_runs
from pipelines.parallel import Workers

Log = Callable[[str], None]
Status = Literal["missing", "stale", "fresh", "forced"]
SESSION_TAG = "tide/session"  # every run of one `tide run` carries its start time: how long a run took is queryable


class _Loading(LoadingContext):
    """A loading context over one instance: what the stale resolver needs outside a webserver request."""

    def __init__(self, instance: dg.DagsterInstance):
        self._instance = instance
        self._loaders = {}

    @property
    def instance(self) -> dg.DagsterInstance:
        return self._instance

    @property
    def loaders(self) -> dict:
        return self._loaders


@dataclass(frozen=True)
class Step:
    """One asset partition the runner looked at."""

    asset: str
    partition: str | None
    status: Status  # what Dagster said before the step (forced: materialized whatever it said)
    causes: tuple[str, ...]  # why it was stale
    executed: bool
    seconds: float = 0.0
    run_id: str | None = None
    success: bool = True

    @property
    def reused(self) -> bool:
        return not self.executed


@dataclass
class RunReport:
    """What `tide run` did, asset partition by asset partition, in the order it did it."""

    steps: list[Step] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return all(s.success for s in self.steps)

    def executed(self) -> list[str]:
        return [_label(s.asset, s.partition) for s in self.steps if s.executed]

    def reused(self) -> list[str]:
        return [_label(s.asset, s.partition) for s in self.steps if s.reused]


def _label(asset: str, partition: str | None) -> str:
    return asset if partition is None else f"{asset}[{partition}]"


def stale_status(defs: dg.Definitions, instance: dg.DagsterInstance, key: dg.AssetKey,
                 partition: str | None) -> tuple[Status, tuple[str, ...]]:
    """Dagster's verdict on one asset partition, with the stale causes the UI shows."""
    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), _Loading(instance))
    status = resolver.get_status(key, partition)
    if status == StaleStatus.FRESH:
        return "fresh", ()
    if status == StaleStatus.MISSING:
        return "missing", ()
    causes = tuple(f"{c.key.asset_key.to_user_string()} {c.reason}" + (
        f" ({c.dependency.asset_key.to_user_string()})" if c.dependency else "")
        for c in resolver.get_stale_root_causes(key, partition))
    return "stale", causes


def materialize(defs: dg.Definitions, instance: dg.DagsterInstance, *, select: str | None = None,
                force: Iterable[str] = (), run_config: dict | None = None, log: Log = print,
                workers: Workers | None = None) -> RunReport:
    """Materialize the selected assets (default all) in dependency order, each partition that is missing
    or stale, plus every partition of the assets named in ``force``. Stops at the first failure (with
    ``workers``, after the asset's partitions in flight finish). ``workers``: the partitions of one asset run
    at the same time on those worker processes (``pipelines.parallel``); assets still run one after another."""
    graph = defs.resolve_asset_graph()
    selected = (dg.AssetSelection.from_string(select).resolve(graph) if select
                else set(graph.materializable_asset_keys))
    forced = {dg.AssetKey.from_user_string(k) for k in force}
    report = RunReport()
    t0 = time.perf_counter()
    tags = {"tide/runner": "tide run", SESSION_TAG: time.strftime("%Y-%m-%dT%H:%M:%S"), **owner_tag()}
    release_killed_runs(instance, log)  # or a pool slot a killed run held is waited for forever
    for key in graph.toposorted_asset_keys:
        if key not in selected:
            continue
        node = graph.get(key)
        partitions = node.partitions_def.get_partition_keys() if node.partitions_def else [None]
        job = defs.resolve_implicit_job_def_def_for_assets([key])
        todo: dict[str, tuple[Status, tuple[str, ...]]] = {}
        for partition in partitions:
            status, causes = ("forced", ()) if key in forced else stale_status(defs, instance, key, partition)
            name = _label(key.to_user_string(), partition)
            if status == "fresh":
                report.steps.append(Step(key.to_user_string(), partition, status, causes, executed=False))
                log(f"[tide] {time.perf_counter() - t0:6.0f}s  {name}: up to date, reused")
                continue
            why = f" ({'; '.join(causes)})" if causes else ""
            log(f"[tide] {time.perf_counter() - t0:6.0f}s  {name}: {status}{why}, materializing")
            if workers is not None and partition is not None:
                todo[partition] = (status, causes)
                continue
            started = time.perf_counter()
            result = job.execute_in_process(instance=instance, partition_key=partition, asset_selection=[key],
                                            run_config=run_config, raise_on_error=False,
                                            tags=tags)
            step = Step(key.to_user_string(), partition, status, causes, executed=True,
                        seconds=round(time.perf_counter() - started, 2), run_id=result.run_id,
                        success=result.success)
            report.steps.append(step)
            if not result.success:
                log(f"[tide] {name} failed; see the error above (run id {result.run_id})")
                return report
        if todo and not _on_workers(workers, key.to_user_string(), todo, run_config, tags, report, log, t0):
            return report
    return report


def _on_workers(workers: Workers, asset: str, todo: dict[str, tuple[Status, tuple[str, ...]]],
                run_config: dict | None, tags: dict, report: RunReport, log: Log, t0: float) -> bool:
    """Run an asset's partitions on the workers; False when one failed."""
    ok = True
    for r in workers.run(asset, list(todo), run_config, tags):
        status, causes = todo[r.partition]
        report.steps.append(Step(asset, r.partition, status, causes, executed=True, seconds=r.seconds,
                                 run_id=r.run_id, success=r.success))
        done = "done" if r.success else f"failed; see the run's logs (run id {r.run_id})"
        log(f"[tide] {time.perf_counter() - t0:6.0f}s  {_label(asset, r.partition)}: {done} in {r.seconds:.0f}s "
            f"on worker {r.worker_pid}")
        ok &= r.success
    return ok
