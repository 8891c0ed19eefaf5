"""The DuckDB warehouse: schema, atomic partition replacement, read-only queries, lock retry."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.schema import TABLES, VIEWS
from storage.warehouse import (
    ReplaceResult,
    UnknownSaeError,
    Warehouse,
    WarehouseLockedError,
    WarehouseMissingError,
    WarehouseQueryError,
    WarehouseReadOnlyError,
    WarehouseSchemaError,
    WarehouseWriteError,
    connect,
    format_table,
    write_table,
)


@pytest.fixture
def wh(tmp_path: Path) -> Warehouse:
    warehouse = Warehouse(tmp_path / "wh" / "warehouse.duckdb", lock_timeout_s=10)
    warehouse.init_schema()
    return warehouse


def _sae(sae_id: str, layer: int = 2) -> dict:
    return {
        "sae_id": sae_id,
        "run_id": "r1",
        "layer": layer,
        "site": "resid",
        "variant": "topk",
        "n_latents": 64,
        "k": 8,
    }


def _features(sae_id: str, n: int, fire: float = 0.1) -> dict:
    return {"sae_id": [sae_id] * n, "feature_id": list(range(n)), "fire_rate": [fire] * n}


# ----------------------------------------------------------------------------------- schema


def test_init_schema_is_idempotent_and_every_table_states_its_grain(wh: Warehouse) -> None:
    wh.init_schema()
    relations = {r.name: r for r in wh.schema()}
    assert set(relations) == set(TABLES) | set(VIEWS)
    for name, spec in TABLES.items():
        info = relations[name]
        assert info.kind == "table"
        assert info.comment and info.comment.startswith("grain: ")
        assert info.grain == spec.grain
        assert [c.name for c in info.columns] == list(spec.column_names)
    assert all(relations[v].kind == "view" and relations[v].comment for v in VIEWS)
    assert "-1" in relations["sae_metrics"].comment  # the overall-step convention is documented


def test_init_schema_names_columns_an_older_file_lacks(wh: Warehouse) -> None:
    with connect(wh.path, read_only=False) as con:
        con.execute("DROP VIEW v_feature_neighbors")
        con.execute("DROP VIEW v_features")
        con.execute("ALTER TABLE features DROP COLUMN label")
        con.execute("INSERT INTO features (sae_id, feature_id, fire_rate) VALUES ('s', 0, 0.5)")
    with pytest.raises(WarehouseSchemaError, match="table features lacks label"):
        Warehouse(wh.path).init_schema()


def test_init_schema_rebuilds_an_empty_table_an_older_file_built(wh: Warehouse) -> None:
    with connect(wh.path, read_only=False) as con:
        con.execute("DROP VIEW v_feature_neighbors")
        con.execute("DROP VIEW v_features")
        con.execute("ALTER TABLE features DROP COLUMN label")
    Warehouse(wh.path).init_schema()  # nothing to lose: rebuilt with the code's columns
    cols = Warehouse(wh.path).query("SELECT column_name FROM duckdb_columns() WHERE table_name = 'features'")
    assert "label" in cols.column(0).to_pylist()


def test_views_join_saes_and_samples(wh: Warehouse) -> None:
    wh.replace_partition("saes", {"run_id": "r1"}, [_sae("s1", layer=3)])
    wh.replace_partition(
        "samples",
        {"run_id": "r1"},
        {"sample_id": [7], "class_id": [4], "class_name": ["four"], "seed": [1], "shard": [0]},
    )
    heat = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    wh.replace_partition(
        "top_images",
        {"sae_id": "s1"},
        {
            "feature_id": [0, 0],
            "scope": ["overall", "peak_step"],
            "rank": [1, 1],
            "sample_id": [7, 7],
            "heatmap": heat,  # (n, h, w) becomes row-major lists
            "grid_h": [4, 4],
            "grid_w": [4, 4],
        },
    )
    rows = wh.query("SELECT layer, class_name, heatmap FROM v_top_images ORDER BY scope").to_pylist()
    assert [(r["layer"], r["class_name"]) for r in rows] == [(3, "four"), (3, "four")]
    assert rows[1]["heatmap"] == heat[1].reshape(-1).tolist()
    wh.replace_partition("features", {"sae_id": "s1"}, {"feature_id": [0], "top_class": [4]})
    assert wh.query("SELECT variant, top_class_name FROM v_features").to_pylist() == [
        {"variant": "topk", "top_class_name": "four"}
    ]


def test_duplicate_grain_is_rejected_and_check_grain_counts_zero(wh: Warehouse) -> None:
    wh.replace_partition("features", {"sae_id": "s1"}, _features("s1", 3))
    dup = {"sae_id": ["s1", "s1"], "feature_id": [5, 5]}
    with pytest.raises(WarehouseWriteError, match="rolled back"):
        wh.replace_partition("features", {"sae_id": "s1"}, dup)
    assert wh.query("SELECT count(*) AS n FROM features").to_pylist() == [{"n": 3}]
    assert all(wh.check_grain(t) == 0 for t in TABLES)


def test_check_constraints_reject_bad_values(wh: Warehouse) -> None:
    with pytest.raises(WarehouseWriteError, match="CHECK"):
        wh.replace_partition("sae_metrics", {"sae_id": "s1"}, {"split": ["test"], "step": [-1]})
    bad_heatmap = {"feature_id": [0], "scope": ["overall"], "rank": [1], "sample_id": [1]}
    bad_heatmap |= {"heatmap": [[1.0, 2.0, 3.0]], "grid_h": [2], "grid_w": [2]}
    with pytest.raises(WarehouseWriteError, match="CHECK"):
        wh.replace_partition("top_images", {"sae_id": "s1"}, bad_heatmap)


# ---------------------------------------------------------------------------------- writing


def test_replace_partition_replaces_only_its_partition(wh: Warehouse) -> None:
    wh.replace_partition("features", {"sae_id": "other"}, _features("other", 2))
    first = wh.replace_partition("features", {"sae_id": "s1"}, _features("s1", 5, fire=0.1))
    assert first == ReplaceResult("features", {"sae_id": "s1"}, rows_deleted=0, rows_inserted=5)
    second = wh.replace_partition("features", {"sae_id": "s1"}, _features("s1", 3, fire=0.7))
    assert (second.rows_deleted, second.rows_inserted) == (5, 3)
    rows = wh.query("SELECT sae_id, count(*) AS n, max(fire_rate) AS f FROM features GROUP BY 1 ORDER BY 1")
    assert rows.to_pylist() == [{"sae_id": "other", "n": 2, "f": 0.1}, {"sae_id": "s1", "n": 3, "f": 0.7}]


def test_failed_replace_keeps_old_rows(wh: Warehouse) -> None:
    wh.replace_partition("features", {"sae_id": "s1"}, _features("s1", 4))
    wrong_type = {"sae_id": ["s1"], "feature_id": ["not a number"]}
    with pytest.raises(WarehouseWriteError, match="old rows are kept"):
        wh.replace_partition("features", {"sae_id": "s1"}, wrong_type)
    outside = _features("s1", 2) | {"sae_id": ["s1", "s2"]}
    with pytest.raises(ValueError, match="outside the partition"):
        wh.replace_partition("features", {"sae_id": "s1"}, outside)
    assert wh.query("SELECT count(*) AS n FROM features WHERE sae_id = 's1'").to_pylist() == [{"n": 4}]


def test_replace_partition_validates_names(wh: Warehouse) -> None:
    with pytest.raises(ValueError, match="unknown table 'features; DROP TABLE runs'"):
        wh.replace_partition("features; DROP TABLE runs", {"sae_id": "s1"}, {})
    with pytest.raises(ValueError, match="views are read-only"):
        wh.replace_partition("v_features", {"sae_id": "s1"}, {})
    with pytest.raises(ValueError, match="lacks; its columns are"):
        wh.replace_partition("features", {"sae id": "s1"}, {})
    with pytest.raises(ValueError, match="no column.*'bogus'"):
        wh.replace_partition("features", {"sae_id": "s1"}, {"feature_id": [1], "bogus": [2]})
    with pytest.raises(ValueError, match="at least one partition column"):
        wh.replace_partition("features", {}, {})


def test_partition_columns_are_filled_and_empty_rows_delete(wh: Warehouse) -> None:
    # numpy scalars and arrays are accepted as they come out of the pipeline
    wh.replace_partition(
        "feature_stats",
        {"sae_id": "s1", "step": np.int64(3)},
        {"feature_id": np.arange(2), "fire_rate": np.array([0.5, 0.2], np.float32)},
    )
    assert wh.query("SELECT DISTINCT sae_id, step FROM feature_stats").to_pylist() == [
        {"sae_id": "s1", "step": 3}
    ]
    result = wh.replace_partition("feature_stats", {"sae_id": "s1", "step": 3}, {})
    assert (result.rows_deleted, result.rows_inserted) == (2, 0)


def test_values_with_quotes_are_stored_verbatim(wh: Warehouse) -> None:
    nasty = "l3'); DROP TABLE saes; --\"x"
    wh.replace_partition("saes", {"sae_id": nasty}, [_sae(nasty)])
    wh.replace_partition("features", {"sae_id": nasty}, {"feature_id": [0], "label": ["it's a 'loop'"]})
    assert wh.known_sae_ids() == [nasty]
    assert wh.query("SELECT label FROM features WHERE sae_id = ?", [nasty]).to_pylist() == [
        {"label": "it's a 'loop'"}
    ]
    assert wh.require_sae(nasty).layer == 2


def test_upsert_run_overwrites(wh: Warehouse) -> None:
    wh.upsert_run("r1", {"seed": 1}, code_version="a")
    wh.upsert_run("r1", {"seed": 2}, code_version="b", model_source="digits")
    rows = wh.query("SELECT run_id, config_json, code_version, created_at FROM runs").to_pylist()
    assert len(rows) == 1 and json.loads(rows[0]["config_json"]) == {"seed": 2}
    assert rows[0]["code_version"] == "b" and rows[0]["created_at"] is not None


def test_require_sae_suggests_close_ids(wh: Warehouse) -> None:
    with pytest.raises(UnknownSaeError, match="holds no SAEs yet"):
        wh.require_sae("l3_topk")
    wh.replace_partition("saes", {"run_id": "r1"}, [_sae("l3_topk"), _sae("l4_topk", layer=4)])
    with pytest.raises(UnknownSaeError, match="Did you mean l3_topk") as err:
        wh.require_sae("l3_topkk")
    assert isinstance(err.value, KeyError) and "Known SAEs: l3_topk, l4_topk" in str(err.value)


# ---------------------------------------------------------------------------------- reading


def test_query_refuses_writes(wh: Warehouse) -> None:
    for sql in (
        "INSERT INTO runs (run_id, config_json) VALUES ('x', '{}')",
        "DROP TABLE runs",
        "COPY runs TO 'x.csv'",
    ):
        with pytest.raises(
            WarehouseReadOnlyError, match="opened read-only: tide sql runs queries, not writes"
        ):
            wh.query(sql)
    with pytest.raises(WarehouseReadOnlyError):
        wh.query("SELECT 1; DELETE FROM runs")


def test_query_errors_carry_duckdb_text(wh: Warehouse) -> None:
    with pytest.raises(WarehouseQueryError, match="syntax error") as err:
        wh.query("SELEC 1")
    assert "syntax error" in err.value.duckdb_message
    with pytest.raises(WarehouseQueryError, match="(?s)nope.*--schema") as err:
        wh.query("SELECT * FROM nope")
    assert "nope" in err.value.duckdb_message


def test_query_params_and_missing_file(wh: Warehouse, tmp_path: Path) -> None:
    assert wh.query("SELECT $a AS a, $b AS b", {"a": 1, "b": "x'y"}).to_pylist() == [{"a": 1, "b": "x'y"}]
    with pytest.raises(WarehouseMissingError, match="no warehouse at"):
        Warehouse(tmp_path / "absent.duckdb").query("SELECT 1")


# ------------------------------------------------------------------------------------ locking

_HOLD = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def _hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_reader_waits_for_writer_then_succeeds(wh: Warehouse) -> None:
    proc = _hold_lock(wh.path, 1.5)
    try:
        start = time.monotonic()
        assert wh.query("SELECT 42 AS x").to_pylist() == [{"x": 42}]
        assert time.monotonic() - start > 0.5  # it really waited for the lock
    finally:
        proc.wait(timeout=30)


def test_lock_timeout_names_the_file(wh: Warehouse) -> None:
    proc = _hold_lock(wh.path, 1.5)
    try:
        impatient = Warehouse(wh.path, lock_timeout_s=0.2)
        with pytest.raises(WarehouseLockedError, match="another process holds it") as err:
            impatient.query("SELECT 1")
        assert str(wh.path) in str(err.value)
        with pytest.raises(WarehouseLockedError):
            impatient.replace_partition("features", {"sae_id": "s1"}, {})
    finally:
        proc.wait(timeout=30)


# --------------------------------------------------------------------------------- formatting


def _result() -> pa.Table:
    return pa.table(
        {
            "id": [1, 2, 3],
            "score": [0.5, float("nan"), None],
            "name": ["a", 'b,"c"', "x" * 100],
            "hist": [[1.0, 2.0], None, list(range(10))],
        }
    )


def test_format_table_text_truncates_rows_and_cells() -> None:
    text = format_table(_result(), "table", max_rows=2)
    lines = text.splitlines()
    assert lines[0].split() == ["id", "score", "name", "hist"]
    assert "NULL" in text or "nan" in text
    assert "(2 of 3 rows shown" in lines[-1]
    assert format_table(_result(), "table").rstrip().endswith("(3 rows)")
    assert "… 10 items" in format_table(_result(), "table") and "x" * 100 not in format_table(_result())


def test_format_csv_and_json_are_complete(tmp_path: Path) -> None:
    csv_text = format_table(_result(), "csv", max_rows=1)
    assert csv_text.count("\n") == 4 and '"[1.0, 2.0]"' in csv_text
    lines = format_table(_result(), "json").splitlines()
    assert [json.loads(line)["score"] for line in lines] == [0.5, None, None]
    assert json.loads(lines[0])["hist"] == [1.0, 2.0]
    with pytest.raises(ValueError, match="unknown format"):
        format_table(_result(), "xml")  # type: ignore[arg-type]


def test_write_table_formats(tmp_path: Path) -> None:
    table = _result()
    back = pq.read_table(write_table(table, "parquet", tmp_path / "out" / "r.parquet"))
    assert back.column_names == table.column_names and back["hist"].to_pylist() == table["hist"].to_pylist()
    assert write_table(table, "csv", tmp_path / "r.csv").read_text() == format_table(table, "csv")
    assert len(write_table(table, "json", tmp_path / "r.jsonl").read_text().splitlines()) == 3
