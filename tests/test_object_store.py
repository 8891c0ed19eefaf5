"""The activation store on an S3 server: moto's server mode (an S3 emulator speaking the S3 HTTP API on a real
socket; no S3-compatible server such as MinIO is installable from the package registries) started by the
test, reached through s3fs like any S3 endpoint. A run with its store there equals one on local disk, and
the tables export there."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import quiet
from tests.test_capture_store import capture_all

s3fs = pytest.importorskip("s3fs", reason="s3fs is in the dev extra: pip install -e '.[dev]'")
pytest.importorskip("moto.server", reason="moto[server] is in the dev extra: pip install -e '.[dev]'")

S3_ENV = {"AWS_ACCESS_KEY_ID": "tide", "AWS_SECRET_ACCESS_KEY": "tide", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """An S3 server on a free port, and the environment s3fs reads its endpoint and keys from (fsspec takes
    FSSPEC_S3_* variables as S3FileSystem arguments), so `tide` code sees a plain s3:// URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "FSSPEC_S3_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, FSSPEC_S3_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)  # re-read FSSPEC_* now that they are set
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=os.environ["FSSPEC_S3_ENDPOINT_URL"])
                fs.mkdir("tide")
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield fs
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        fsspec.config.conf.pop("s3", None)


def test_a_store_on_s3_equals_one_on_local_disk(s3, tiny_project):
    remote = capture_all(tiny_project({"warehouse": {"store_url": "s3://tide/acts.zarr"},
                                       "sampling": {"num_samples": 16}}, name="s3"))
    local = capture_all(tiny_project({"sampling": {"num_samples": 16}}, name="local"))
    assert remote.url.startswith("s3://") and remote.done_shards() == local.done_shards() == [0, 1]
    assert s3.exists("tide/acts.zarr/zarr.json")
    for site in local.layout.sites:
        for layer in local.layout.layers:
            assert np.array_equal(remote.read_samples(site, layer, 0, 16), local.read_samples(site, layer, 0, 16))
            assert np.array_equal(remote.read_block(site, layer, local.layout.steps[1], 1),
                                  local.read_block(site, layer, local.layout.steps[1], 1))
    assert np.array_equal(remote.images(), local.images())
    batches = [list(s.iter_token_batches("resid", 1, batch_size=64, seed=3)) for s in (remote, local)]
    assert all(np.array_equal(a.acts, b.acts) for a, b in zip(*batches, strict=True))


def test_a_run_with_its_store_on_s3_publishes_and_exports_its_tables_there(s3, tiny_project):
    from pipelines.definitions import definitions_for
    from pipelines.instance import warehouse_instance
    from pipelines.runner import materialize
    from storage import Warehouse, export_tables

    project = tiny_project({"warehouse": {"store_url": "s3://tide/run.zarr"}, "sampling": {"num_samples": 16},
                            "sae": {"variants": ["topk"], "spec": {"n_latents": 32, "k": 4}},
                            "edit": {"n_samples": 2}})
    report = materialize(definitions_for(project), warehouse_instance(project), log=lambda m: None)
    assert report.success
    wh = Warehouse(project.duckdb_path)
    assert wh.query("SELECT count(*) AS n FROM features").to_pylist()[0]["n"] > 0
    written = {t.name: t for t in export_tables(wh, "s3://tide/tables")}
    assert written["features"].path == "s3://tide/tables/features.parquet"
    with s3.open("tide/tables/features.parquet", "rb") as f:
        back = pq.read_table(f)
    assert back.num_rows == written["features"].rows > 0
    assert back.schema.metadata[b"tide.grain"] == b'["sae_id", "feature_id"]'
    assert quiet(project).store().url == "s3://tide/run.zarr"
