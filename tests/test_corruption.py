"""Damaged files give errors that name the file and the repair, never a silent wrong answer."""

import duckdb
import numpy as np
import pytest

from storage import StoreError, Warehouse, WarehouseError, WarehouseSchemaError
from tests.test_open_formats import LAYOUT, small_store

REPAIR = "run `tide run --force activations`"


@pytest.fixture
def store(tmp_path):
    return small_store(str(tmp_path / "acts.zarr"))


def chunk_file(store, step: int, shard: int):
    arr = store.array("resid", 1)
    key = arr.metadata.encode_chunk_key((store.layout.step_axis(step), shard, 0, 0))
    return store.url + f"/{arr.path}/{key}"


def every_read(store):
    """Each reader over shard 1 (the damaged one in these tests), each of which must refuse."""
    return [lambda: store.read_step("resid", 1, 2), lambda: store.read_samples("resid", 1, 4, 8),
            lambda: store.read_block("resid", 1, 2, 1),
            lambda: list(store.iter_token_batches("resid", 1, batch_size=8, seed=0))]


@pytest.mark.parametrize("damage, what", [("truncate", "holds"), ("delete", "is missing")])
def test_a_done_shard_with_a_short_or_missing_chunk_is_refused(store, damage, what):
    path = chunk_file(store, step=2, shard=1)
    if damage == "truncate":  # cut short, as by a full disk
        with open(path, "r+b") as f:
            f.truncate(10)
    else:  # a done marker without its data: zarr alone would read zeros
        import os

        os.remove(path)
    for read in every_read(store):
        with pytest.raises(StoreError) as err:
            read()
        msg = str(err.value)
        assert path in msg and what in msg and "shard 1" in msg, msg
        assert f"{store.url}/shards/00001" in msg and REPAIR in msg, msg
    np.testing.assert_array_equal(store.read_block("resid", 1, 2, 0), np.full((4, 6, 3), 2, np.float16))


def test_the_repair_the_message_names_works(store):
    import shutil

    path = chunk_file(store, step=0, shard=1)
    with open(path, "r+b") as f:
        f.truncate(10)
    shutil.rmtree(f"{store.url}/shards/00001")  # what the message says to delete
    assert store.missing_shards() == [1]  # so `tide run --force activations` samples it again
    with pytest.raises(StoreError, match="shard 1 .* not complete"):
        store.read_step("resid", 1, 0)


def test_a_compressed_store_is_checked_the_same_way(tmp_path):
    from storage import StoreLayout

    packed = small_store(str(tmp_path / "z.zarr"), StoreLayout(**{**LAYOUT.__dict__, "compression": "zstd"}))
    import os

    os.remove(chunk_file(packed, step=2, shard=1))
    with pytest.raises(StoreError, match="is missing"):
        packed.read_block("resid", 1, 2, 1)


def test_a_torn_done_marker_names_its_file(store):
    marker = f"{store.url}/shards/00001/zarr.json"
    with open(marker, "w") as f:
        f.write('{"zarr_format": 3, "node_ty')
    with pytest.raises(StoreError) as err:
        store.shard_stats(1)
    assert marker in str(err.value) and "torn" in str(err.value) and "--force activations" in str(err.value)


def test_a_file_that_is_not_a_duckdb_database(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    path.write_bytes(b"\x00torn\x00" * 1000)
    for call in (lambda: Warehouse(path).query("SELECT 1"), lambda: Warehouse(path).init_schema()):
        with pytest.raises(WarehouseError) as err:
            call()
        msg = str(err.value)
        assert f"{path} is not a DuckDB database" in msg and f"mv {path} {path}.broken" in msg
        assert "--force samples --force sae" in msg
    assert path.read_bytes() == b"\x00torn\x00" * 1000  # left as it was


def test_a_duckdb_file_without_the_warehouse_tables(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE orders (id INT)")
    wh = Warehouse(path)
    with pytest.raises(WarehouseSchemaError) as err:
        wh.init_schema()
    msg = str(err.value)
    assert f"{path} is a DuckDB database but not a TIDE warehouse: it holds orders" in msg
    assert "warehouse.root" in msg and "--force samples --force sae" in msg
    with pytest.raises(WarehouseSchemaError, match="not a TIDE warehouse"):
        wh.query("SELECT * FROM samples")
    with duckdb.connect(str(path), read_only=True) as con:  # nothing of ours was written into it
        assert con.execute("SELECT table_name FROM duckdb_tables()").fetchall() == [("orders",)]
