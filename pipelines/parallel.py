"""`tide run --workers N`: the partitions of one asset on N worker processes of a dask.distributed cluster.

The partitions of an asset (capture shards, SAE layer x site, feature-pass layer x site) are independent by
construction, so `tide run` may hand them to dask.distributed, the engine the feature pass already uses,
instead of running them one by one. Each task is the same thing the serial runner does: one Dagster run of
one asset partition, executed in-process (here: in the worker process) on the warehouse's own instance, so
every run still shows in `tide ui` with its logs and data versions. The Dagster definitions are built once
per worker process. Writers of shared state keep their own rules: each capture shard writes only its own
Zarr chunks and marker; DuckDB writers take the file for one short transaction and retry while another
holds it (``storage.connection``).

Each worker runs torch with cores / N threads, so N workers together use the machine's cores once. A
`LocalCluster` starts the workers on this machine; `scheduler` (a dask scheduler address) uses a cluster
that is already running, e.g. one worker per GPU started with dask-cuda's `LocalCUDACluster`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class PartitionRun:
    """What one worker's run of one asset partition came to."""

    partition: str
    run_id: str
    success: bool
    seconds: float
    worker_pid: int


def _unshadow(local_directory: str) -> None:
    """A dask worker puts its scratch folder on sys.path (for uploaded files); the folder holds a `storage`
    spill folder, which would shadow this project's `storage` package as an empty namespace package."""
    sys.path[:] = [p for p in sys.path if os.path.abspath(p) != os.path.abspath(local_directory)]


def warm(config_path: str, dask_worker=None) -> None:
    """Ahead of a worker's first task (``Client.run`` passes ``dask_worker``): load the definitions, and load
    the model once, so the imports (torch, diffusers, transformers) and first-call costs are paid now."""
    from pipelines.context import RunContext
    from pipelines.project import Project

    _unshadow(dask_worker.local_directory)
    _definitions(config_path)
    _ = RunContext(Project.load(config_path), log=lambda m: None).model  # loads it


@cache
def _definitions(config_path: str):
    """The project's definitions and instance, built once per worker process."""
    from pipelines.definitions import definitions_for
    from pipelines.instance import warehouse_instance
    from pipelines.project import Project

    project = Project.load(config_path)
    return definitions_for(project), warehouse_instance(project)


def run_partition(config_path: str, asset: str, partition: str, run_config: dict | None, tags: dict,
                  threads: int) -> PartitionRun:
    """One Dagster run of one asset partition, in this (worker) process."""
    import dagster as dg
    import torch
    from distributed import get_worker

    torch.set_num_threads(threads)
    _unshadow(get_worker().local_directory)
    defs, instance = _definitions(config_path)
    job = defs.resolve_implicit_job_def_def_for_assets([dg.AssetKey.from_user_string(asset)])
    started = time.perf_counter()
    result = job.execute_in_process(instance=instance, partition_key=partition, run_config=run_config,
                                    asset_selection=[dg.AssetKey.from_user_string(asset)], raise_on_error=False,
                                    tags=tags)
    return PartitionRun(partition, result.run_id, result.success, round(time.perf_counter() - started, 2),
                        os.getpid())


class Workers:
    """A dask.distributed client over N worker processes (started here, or a running cluster's)."""

    def __init__(self, config_path: Path, n: int, scheduler: str | None = None):
        import dask
        from distributed import Client, LocalCluster

        if n < 2 and scheduler is None:
            raise ValueError("Workers needs n >= 2 (one worker is the serial runner)")
        self.config_path = str(config_path)
        if scheduler is None:
            # processes, not threads: each run holds the GIL for its Python parts and torch for its own.
            # dask's nannies set MALLOC_TRIM_THRESHOLD_ for their workers, which pins glibc's mmap threshold:
            # every tensor over 128 kB is then mapped and unmapped anew, and torch ran 1.6x slower in a worker
            # than in this process (a 2048 x 256 matmul loop: 13.8 s against 8.8 s). glibc's default it is.
            with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
                self._cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                             dashboard_address=None)
            self.client = Client(self._cluster)
        else:
            self._cluster = None
            self.client = Client(scheduler)
        self.n = len(self.client.scheduler_info()["workers"]) or n
        self.threads = max(1, (os.cpu_count() or 1) // self.n)

    def run(self, asset: str, partitions: list[str], run_config: dict | None, tags: dict) -> Iterator[PartitionRun]:
        """Every partition as its own task; results as they finish."""
        from distributed import as_completed

        futures = [self.client.submit(run_partition, self.config_path, asset, p, run_config, tags, self.threads,
                                      key=f"{asset}[{p}]-{time.time_ns()}", pure=False) for p in partitions]
        for future in as_completed(futures):
            yield future.result()

    def warm(self) -> None:
        """Every worker loads the definitions and the model now (a first task pays for them otherwise: 5 s
        for the tiny PixArt, mostly imports)."""
        self.client.run(warm, self.config_path)

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
