"""The DuckDB warehouse: schema, atomic partition replacement, read-only queries, lock retry."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage
from pipelines.table_format import format_table
from storage import (
    TABLES,
    VIEWS,
    ReplaceResult,
    StorageError,
    UnknownSaeError,
    Warehouse,
    WarehouseError,
    WarehouseLockedError,
    WarehouseMissingError,
    WarehouseQueryError,
    WarehouseReadOnlyError,
    WarehouseSchemaError,
    WarehouseWriteError,
    connect,
    csv_bytes,
    write_table,
)

REPO = Path(__file__).resolve().parents[1]


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
        con.execute("DROP VIEW v_top_images")
        con.execute("ALTER TABLE top_images DROP COLUMN sample_id")  # NOT NULL: old rows would break it
        con.execute("INSERT INTO top_images (sae_id, feature_id, scope, rank) VALUES ('s', 0, 'overall', 1)")
    with pytest.raises(WarehouseSchemaError, match="table top_images lacks sample_id"):
        Warehouse(wh.path).init_schema()


def test_init_schema_adds_a_nullable_column_in_place_keeping_the_rows(wh: Warehouse) -> None:
    with connect(wh.path, read_only=False) as con:
        con.execute("DROP VIEW v_feature_neighbors")
        con.execute("DROP VIEW v_features")
        con.execute("ALTER TABLE features DROP COLUMN label")
        con.execute("INSERT INTO features (sae_id, feature_id, fire_rate) VALUES ('s', 0, 0.5)")
    Warehouse(wh.path).init_schema()
    rows = Warehouse(wh.path).query("SELECT sae_id, fire_rate, label FROM v_features").to_pylist()
    assert rows == [{"sae_id": "s", "fire_rate": 0.5, "label": None}]


def test_init_schema_rebuilds_an_empty_table_an_older_file_built(wh: Warehouse) -> None:
    with connect(wh.path, read_only=False) as con:
        con.execute("DROP VIEW v_feature_neighbors")
        con.execute("DROP VIEW v_features")
        con.execute("ALTER TABLE features DROP COLUMN label")
    Warehouse(wh.path).init_schema()  # nothing to lose: rebuilt with the code's columns
    cols = Warehouse(wh.path).query("SELECT column_name FROM duckdb_columns() WHERE table_name = 'features'")
    assert "label" in cols.column(0).to_pylist()


def test_init_schema_widens_a_check_an_older_file_has_keeping_the_rows(wh: Warehouse) -> None:
    """A file whose feature_concepts allowed fewer concept kinds takes the new ones, with its rows kept."""
    with connect(wh.path, read_only=False) as con:
        con.execute("DROP VIEW v_feature_concepts")
        con.execute("DROP TABLE feature_concepts")
        con.execute("CREATE TABLE feature_concepts (sae_id VARCHAR, feature_id INTEGER, concept VARCHAR, kind VARCHAR "
                    "CHECK (kind IN ('class', 'word', 'tag')), images BIGINT, fire_rate DOUBLE, mean_act DOUBLE, "
                    "lift DOUBLE, PRIMARY KEY (sae_id, feature_id, concept))")
        con.execute("INSERT INTO feature_concepts VALUES ('s', 0, 'seven', 'class', 3, 0.5, 1.0, 2.0)")
        with pytest.raises(duckdb.ConstraintException):
            con.execute("INSERT INTO feature_concepts VALUES ('s', 0, 'red', 'colour', 3, 0.5, 1.0, 2.0)")
    Warehouse(wh.path).init_schema()
    with connect(wh.path, read_only=False) as con:
        con.execute("INSERT INTO feature_concepts VALUES ('s', 0, 'red', 'colour', 3, 0.5, 1.0, 2.0)")
        with pytest.raises(duckdb.ConstraintException):  # still a CHECK: only the declared kinds
            con.execute("INSERT INTO feature_concepts VALUES ('s', 1, 'x', 'flavour', 3, 0.5, 1.0, 2.0)")
    rows = Warehouse(wh.path).query("SELECT concept, kind FROM v_feature_concepts ORDER BY concept").to_pylist()
    assert rows == [{"concept": "red", "kind": "colour"}, {"concept": "seven", "kind": "class"}]


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


# ------------------------------------------------------------------------------ transactions


def _metrics(sae_id: str, mse: float) -> dict:
    return {"sae_id": [sae_id], "split": ["train"], "step": [-1], "mse": [mse]}


def _state(wh: Warehouse) -> tuple[list, list]:
    saes = wh.query("SELECT sae_id, layer FROM saes ORDER BY sae_id").to_pylist()
    metrics = wh.query("SELECT sae_id, mse FROM sae_metrics ORDER BY sae_id").to_pylist()
    return saes, metrics


def test_transaction_failing_in_its_second_table_keeps_both_tables_old_rows(wh: Warehouse) -> None:
    wh.replace_partition("saes", {"sae_id": "s1"}, [_sae("s1", layer=2)])
    wh.replace_partition("sae_metrics", {"sae_id": "s1"}, _metrics("s1", 0.5))
    before = _state(wh)
    with pytest.raises(WarehouseWriteError, match="(?s)'sae_metrics'.*rolled back.*CHECK"):
        with wh.transaction() as tx:
            assert tx.replace_partition("saes", {"sae_id": "s1"}, [_sae("s1", layer=9)]).rows_inserted == 1
            tx.replace_partition("sae_metrics", {"sae_id": "s1"}, _metrics("s1", 0.1) | {"split": ["test"]})
    assert _state(wh) == before
    # A validation error (raised before any SQL) rolls back the writes before it just the same.
    with pytest.raises(ValueError, match="no column.*'bogus'"):
        with wh.transaction() as tx:
            tx.replace_partition("saes", {"sae_id": "s1"}, [_sae("s1", layer=9)])
            tx.replace_partition("sae_metrics", {"sae_id": "s1"}, _metrics("s1", 0.1) | {"bogus": [1]})
    assert _state(wh) == before


def test_transaction_commits_every_table_together_and_isolates_them(wh: Warehouse) -> None:
    wh.replace_partition("saes", {"sae_id": "s1"}, [_sae("s1", layer=2)])
    wh.replace_partition("sae_metrics", {"sae_id": "s1"}, _metrics("s1", 0.5))
    before = _state(wh)
    # Another connection to the file (the same process: another one could not even open it) sees
    # none of the block's rows until the block ends.
    with connect(wh.path, read_only=False) as other, wh.transaction() as tx:
        tx.replace_partition("saes", {"sae_id": "s1"}, [_sae("s1", layer=7)])
        assert other.execute("SELECT layer FROM saes").fetchall() == [(2,)]
        tx.replace_partition("sae_metrics", {"sae_id": "s1"}, _metrics("s1", 0.25))
        tx.replace_partition("features", {"sae_id": "s1"}, {})  # clearing a table is a write too
        tx.upsert_run("r1", {"seed": 3})
        assert other.execute("SELECT count(*) FROM runs").fetchall() == [(0,)]
    assert _state(wh) != before
    assert _state(wh) == ([{"sae_id": "s1", "layer": 7}], [{"sae_id": "s1", "mse": 0.25}])
    assert wh.query("SELECT run_id FROM runs").to_pylist() == [{"run_id": "r1"}]
    with pytest.raises(WarehouseWriteError, match="after its transaction ended"):
        tx.replace_partition("saes", {"sae_id": "s1"}, [_sae("s1")])


def test_transaction_rolls_back_on_any_exception_and_when_a_failed_write_was_caught(wh: Warehouse) -> None:
    wh.replace_partition("saes", {"sae_id": "s1"}, [_sae("s1", layer=2)])
    before = _state(wh)
    with pytest.raises(RuntimeError, match="stage crashed"):
        with wh.transaction() as tx:
            tx.replace_partition("saes", {"sae_id": "s1"}, [_sae("s1", layer=9)])
            raise RuntimeError("stage crashed")
    assert _state(wh) == before
    # DuckDB aborts a transaction on its first error and then "commits" nothing without a word:
    # catching the error inside the block must not pass for success.
    with pytest.raises(WarehouseWriteError, match="none of its writes were committed"):
        with wh.transaction() as tx:
            tx.replace_partition("saes", {"sae_id": "s2"}, [_sae("s2")])
            with pytest.raises(WarehouseWriteError, match="rolled back"):
                tx.replace_partition("saes", {"sae_id": "s2"}, [_sae("s2"), _sae("s2")])  # duplicate grain
            with pytest.raises(WarehouseWriteError, match="failed earlier in this transaction"):
                tx.replace_partition("saes", {"sae_id": "s3"}, [_sae("s3")])
    with pytest.raises(WarehouseWriteError, match="none of its writes were committed"):
        with wh.transaction() as tx:  # a bad argument dooms it too: all or nothing
            tx.replace_partition("saes", {"sae_id": "s2"}, [_sae("s2")])
            with pytest.raises(ValueError, match="unknown table"):
                tx.replace_partition("sae", {"sae_id": "s2"}, [_sae("s2")])
    assert _state(wh) == before


def test_a_partition_replaced_twice_in_one_transaction_holds_its_last_rows(wh: Warehouse) -> None:
    wh.replace_partition("features", {"sae_id": "s1"}, _features("s1", 4, fire=0.1))
    with wh.transaction() as tx:  # clear first, write later: the SAE stage's pattern
        assert tx.replace_partition("features", {"sae_id": "s1"}, {}).rows_deleted == 4
        tx.replace_partition("features", {"sae_id": "s1"}, _features("s1", 3, fire=0.2))
        again = tx.replace_partition("features", {"sae_id": "s1"}, _features("s1", 5, fire=0.3))
    assert (again.rows_deleted, again.rows_inserted) == (3, 5)
    rows = wh.query("SELECT count(*) AS n, max(fire_rate) AS f FROM features").to_pylist()
    assert rows == [{"n": 5, "f": 0.3}]


_CRASH = """
import os, sys
from storage import Warehouse
wh = Warehouse(sys.argv[1])
with wh.transaction() as tx:
    row = {"sae_id": "s1", "run_id": "r1", "layer": 9, "site": "resid", "variant": "topk", "n_latents": 64}
    tx.replace_partition("saes", {"sae_id": "s1"}, [row])
    os._exit(3)  # killed between the two tables' writes
"""


def test_a_process_killed_inside_a_transaction_leaves_the_old_rows(wh: Warehouse) -> None:
    wh.replace_partition("saes", {"sae_id": "s1"}, [_sae("s1", layer=2)])
    wh.replace_partition("sae_metrics", {"sae_id": "s1"}, _metrics("s1", 0.5))
    before = _state(wh)
    crashed = subprocess.run([sys.executable, "-c", _CRASH, str(wh.path)], cwd=REPO, timeout=120)
    assert crashed.returncode == 3
    assert _state(wh) == before


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
    assert write_table(table, "csv", tmp_path / "r.csv").read_bytes() == csv_bytes(table)
    assert format_table(table, "csv") == csv_bytes(table).decode()  # printed and written alike
    jsonl = write_table(table, "json", tmp_path / "r.jsonl").read_text()
    assert jsonl == format_table(table, "json") and len(jsonl.splitlines()) == 3
    with pytest.raises(ValueError, match="unknown output format"):
        write_table(table, "xml", tmp_path / "r.xml")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ package


def test_public_api_resolves_and_every_error_shares_one_root() -> None:
    for name in storage.__all__:
        module = importlib.import_module(storage._MODULE_OF[name])
        assert getattr(storage, name) is getattr(module, name), name
    errors = [getattr(storage, n) for n in storage.__all__ if n.endswith("Error")]
    assert len(errors) == 11 and all(issubclass(e, StorageError) for e in errors)
    assert issubclass(storage.StoreError, ValueError) and issubclass(WarehouseLockedError, TimeoutError)
    assert issubclass(WarehouseReadOnlyError, WarehouseQueryError) and issubclass(UnknownSaeError, KeyError)
    assert issubclass(WarehouseMissingError, FileNotFoundError)
    assert issubclass(WarehouseMissingError, WarehouseError)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        storage.nope  # noqa: B018


def test_reading_the_warehouse_does_not_import_zarr() -> None:
    code = "import sys, storage.warehouse, storage; storage.Warehouse; print('zarr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
