"""`tide run --workers 2`: the partitions of an asset on two worker processes of a dask.distributed cluster
give the store a serial run gives, bit for bit, and SAE layers train side by side."""

from __future__ import annotations

import numpy as np

from tests.test_capture_store import capture_all


def test_capture_on_two_worker_processes_equals_a_serial_capture(tiny_project):
    from pipelines.definitions import definitions_for
    from pipelines.instance import warehouse_instance
    from pipelines.parallel import Workers
    from pipelines.runner import materialize
    from storage import ActivationStore, Warehouse

    overrides = {"sampling": {"num_samples": 24, "shard_size": 6},
                 "sae": {"variants": ["topk"], "spec": {"n_latents": 32, "k": 4}}}
    serial = capture_all(tiny_project(overrides, name="serial"))
    project = tiny_project(overrides, name="parallel")
    with Workers(project.config_path, 2) as workers:
        report = materialize(definitions_for(project), warehouse_instance(project), log=lambda m: None,
                             select="key:activation_store or key:activations or key:samples or key:sae",
                             workers=workers)
    assert report.success
    shards = [s for s in report.steps if s.asset == "activations"]
    assert len(shards) == 4 and all(s.executed for s in shards)
    parallel = ActivationStore.open(project.store_url, mode="r")
    assert parallel.done_shards() == serial.done_shards() == [0, 1, 2, 3]
    for site in serial.layout.sites:
        for layer in serial.layout.layers:
            assert np.array_equal(parallel.read_samples(site, layer, 0, 24), serial.read_samples(site, layer, 0, 24))
    assert np.array_equal(parallel.images(), serial.images())
    saes = Warehouse(project.duckdb_path).query("SELECT layer, site FROM saes ORDER BY layer").to_pylist()
    assert [s["layer"] for s in saes] == sorted(serial.layout.layers)  # each layer trained by a worker
