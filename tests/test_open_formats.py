"""The store and the warehouse read by generic tools: xarray coordinates, no zarr warnings, Parquet export."""

import json
import shutil
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage import ActivationStore, ShardStats, StoreLayout

LAYOUT = StoreLayout(num_samples=8, shard_size=4, steps=[0, 2], layers=[1], sites=["resid"], tokens_total=6,
                     tokens_stored=6, token_grid=[2, 3], d_model=3, image_shape=[2, 2, 1])
PROVENANCE = {"capture_timesteps": [900, 100]}


def small_store(url: str, layout: StoreLayout = LAYOUT) -> ActivationStore:
    """A store with every shard written and marked done, without a model."""
    store = ActivationStore.create(url, layout, PROVENANCE)
    for shard in range(layout.num_shards):
        n = len(store.begin_shard(shard))
        store.write_samples(shard, np.zeros((n, 2, 2, 1), np.uint8), np.arange(n), np.arange(n))
        for step in layout.steps:
            acts = np.full((n, layout.tokens_stored, layout.d_model), shard + step, np.float32)
            index = np.tile(np.arange(layout.tokens_stored, dtype=np.int16), (n, 1)) if layout.subsampled else None
            store.write_step(shard, step, {("resid", 1): acts}, index)
        store.mark_done(shard, ShardStats(shard, n, raw_bytes=123))
    return store


def open_everything(url: str):
    """What a user does with plain zarr and xarray, with any warning made an error."""
    import xarray as xr
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        members = dict(zarr.open_group(url, mode="r").members(max_depth=None))
        return members, xr.open_zarr(url, group="acts/resid", consolidated=False)


def test_xarray_shows_steps_timesteps_samples_and_the_token_grid(tiny_project):
    from pipelines.stages import capture
    from tests.conftest import quiet

    project = tiny_project({"capture": {"steps": [0, 2, 3]}})
    ctx = quiet(project)
    capture.create_store(ctx)
    capture.write_shard(ctx, 0)
    store = ActivationStore.open(project.store_url, mode="r")
    members, ds = open_everything(project.store_url)
    assert "shards/00000" in members  # the done marker is a member of the hierarchy, not a stray object
    layer = ds["layer_01"]
    assert layer.dims == ("step", "sample", "token", "channel")
    assert ds["step"].values.tolist() == [0, 2, 3]
    assert ds["timestep"].values.tolist() == store.provenance["capture_timesteps"]
    assert ds["sample_id"].values.tolist() == list(range(24))
    gh, gw = store.layout.token_grid
    assert (ds["row"].values * gw + ds["col"].values).tolist() == list(range(gh * gw))
    # select by timestep as a user would, and get the stored numbers
    t = store.provenance["capture_timesteps"][1]
    picked = layer.swap_dims(step="timestep").sel(timestep=t).isel(sample=slice(0, 8)).values
    np.testing.assert_array_equal(picked, store.read_step("resid", 1, 2, range(0, 8)))


def test_a_subsampled_store_has_no_row_col_but_still_timesteps(tmp_path):
    sub = StoreLayout(**{**LAYOUT.__dict__, "tokens_stored": 2})
    small_store(str(tmp_path / "s.zarr"), sub)
    _, ds = open_everything(str(tmp_path / "s.zarr"))
    assert "row" not in ds.coords and ds["timestep"].values.tolist() == [900, 100]


def make_legacy(url) -> None:
    """Turn a store into an older one: `.done` files, no shards group, no coordinates."""
    import zarr

    root = url
    shutil.rmtree(root / "shards")
    (root / "shards").mkdir()
    for shard in range(LAYOUT.num_shards):
        (root / "shards" / f"{shard:05d}.done").write_text(json.dumps({"shard": shard, "samples": 4,
                                                                       "raw_bytes": 7, "seconds": 0.5}))
    for name in ("step", "timestep", "sample_id", "row", "col"):
        shutil.rmtree(root / "acts" / "resid" / name)
    del zarr.open_group(str(root), mode="r+")["acts/resid/layer_01"].attrs["coordinates"]


def test_a_store_written_before_the_move_still_reads_resumes_and_is_migrated(tmp_path):
    url = tmp_path / "old.zarr"
    small_store(str(url))
    make_legacy(url)
    old = ActivationStore.open(str(url), mode="r")
    assert old.done_shards() == [0, 1] and old.shard_stats(1)["raw_bytes"] == 7
    np.testing.assert_array_equal(old.read_block("resid", 1, 2, 1), np.full((4, 6, 3), 3, np.float16))
    with pytest.raises(UserWarning, match="not recognized as a component"):
        open_everything(str(url))  # what the move is for

    store = ActivationStore.create(str(url), LAYOUT, PROVENANCE)  # reopened upstream, as `tide run` does
    assert not list((url / "shards").glob("*.done"))
    assert store.done_shards() == [0, 1] and store.shard_stats(1)["raw_bytes"] == 7  # kept
    _, ds = open_everything(str(url))  # no warning now
    assert ds["timestep"].values.tolist() == [900, 100]
    store.begin_shard(1)  # resume: a shard is invalidated and written again
    assert store.missing_shards() == [1]
    store.mark_done(1, ShardStats(1, 4, raw_bytes=9))
    assert store.done_shards() == [0, 1] and store.shard_stats(1)["raw_bytes"] == 9


def test_a_torn_legacy_marker_marks_nothing(tmp_path):
    url = tmp_path / "old.zarr"
    small_store(str(url))
    make_legacy(url)
    (url / "shards" / "00001.done").write_text('{"shard": 1, "samp')  # cut short
    store = ActivationStore.create(str(url), LAYOUT, PROVENANCE)
    assert store.missing_shards() == [1]  # sampled again by the next run


def test_export_writes_every_table_with_its_grain_and_description(tmp_path, monkeypatch, capsys):
    import duckdb

    from pipelines.cli import main
    from storage import TABLES, Warehouse

    (tmp_path / "tide.toml").write_text('[warehouse]\nroot = "wh"\n')
    wh = Warehouse(tmp_path / "wh" / "warehouse.duckdb")
    wh.init_schema()
    wh.replace_partition("samples", {"run_id": "r1"}, {
        "sample_id": [1, 0], "class_id": [7, 3], "class_name": ["7", "3"], "seed": [12, 11], "shard": [0, 0]})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("TIDE_CONFIG", "")
    out_dir = tmp_path / "export"
    assert main(["export", "--config", str(tmp_path / "tide.toml"), "--format", "parquet", str(out_dir)]) == 0
    assert f"{out_dir / 'samples.parquet'}: 2 rows" in capsys.readouterr().out
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{name}.parquet" for name in TABLES)
    for name, table in TABLES.items():
        schema = pq.read_schema(out_dir / f"{name}.parquet")
        assert schema.metadata[b"tide.table"].decode() == name
        assert json.loads(schema.metadata[b"tide.grain"]) == list(table.grain)
        assert schema.metadata[b"tide.description"].decode() == table.grain_doc
        assert schema.names == list(table.column_names)
        documented = next(c for c in table.columns if c.doc)
        assert schema.field(documented.name).metadata[b"description"].decode() == documented.doc
    rows = duckdb.sql(f"SELECT sample_id, class_name FROM '{out_dir / 'samples.parquet'}'").fetchall()
    assert rows == [(0, "3"), (1, "7")]  # ordered by the grain
    import pandas as pd

    assert pd.read_parquet(out_dir / "samples.parquet")["seed"].tolist() == [11, 12]


def test_export_of_an_older_file_writes_its_missing_tables_empty(tmp_path):
    import duckdb

    from storage import TABLES, Warehouse, export_tables
    from storage.ddl import create_table_sql

    path = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(create_table_sql(TABLES["runs"]))
    written = {t.name: t for t in export_tables(Warehouse(path), tmp_path / "out")}
    assert set(written) == set(TABLES) and written["features"].rows == 0
    schema = pq.read_schema(tmp_path / "out" / "features.parquet")
    assert schema.names == list(TABLES["features"].column_names)
