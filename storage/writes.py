"""Writing the warehouse: partitions replaced by delete-then-insert, several tables in one transaction.

``transaction(con)`` begins a transaction on an open read-write connection and yields a ``Writes``;
``Warehouse.transaction`` wraps it with the connection and the schema. Every write of the block
commits together when it ends, or none does: an exception rolls back the whole transaction, so a
stage that rewrites an SAE's rows in several tables is never seen (or left by a crash) half done.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from storage.connection import bindable, count_of
from storage.ddl import quote_ident, table_spec
from storage.errors import WarehouseWriteError
from storage.schema import Table

Rows = pa.Table | pa.RecordBatch | Mapping[str, Any] | Sequence[Mapping[str, Any]]
_NEW_ROWS = "_tide_new_rows"  # name the incoming Arrow table is registered under during a write


@dataclass(frozen=True)
class ReplaceResult:
    table: str
    where: dict[str, object]
    rows_deleted: int
    rows_inserted: int


@dataclass(frozen=True)
class Replacement:
    """One validated ``replace_partition``: the table, the partition's values and the new rows."""

    spec: Table
    where: dict[str, object]
    data: pa.Table

    @classmethod
    def of(cls, table: str, where: Mapping[str, object], rows: Rows) -> Replacement:
        """Validate names and rows without touching the file (a ValueError says what to change)."""
        spec = table_spec(table)
        plain = {key: bindable(value) for key, value in where.items()}
        if not plain:
            raise ValueError(
                f"replace_partition({table!r}) needs at least one partition column in `where`, e.g. "
                f"{{{spec.grain[0]!r}: ...}}; an empty `where` would replace the whole table"
            )
        for key, value in plain.items():
            if key not in spec.column_names:
                raise ValueError(
                    f"`where` names column {key!r}, which table {table!r} lacks; "
                    f"its columns are {', '.join(spec.column_names)}"
                )
            if value is None:
                raise ValueError(f"`where[{key!r}]` is None; a partition is selected by concrete values")
        data = _as_arrow(rows)
        _check_columns(spec, data)
        return cls(spec, plain, data)


class Writes:
    """The writes of one transaction: ``Warehouse.transaction``.

    A write that raises, for bad arguments or in DuckDB, dooms the transaction (DuckDB aborts it on
    any error): later writes are refused and the block's end rolls back, raising
    ``WarehouseWriteError`` even if the block caught the first error, rather than commit the writes
    around the failed one.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self._con = con
        self._failed: str | None = None  # the write that doomed the transaction
        self._ended = False

    def replace_partition(self, table: str, where: Mapping[str, object], rows: Rows) -> ReplaceResult:
        """As ``Warehouse.replace_partition``; other connections see the rows once the block commits."""
        try:
            change = Replacement.of(table, where, rows)
        except BaseException:
            self._failed = f"replace_partition({table!r}, {where!r})"
            raise
        return self.apply(change)

    def upsert_run(
        self,
        run_id: str,
        config: str | Mapping[str, Any],
        *,
        code_version: str | None = None,
        model_source: str | None = None,
        model_hash: str | None = None,
    ) -> ReplaceResult:
        """As ``Warehouse.upsert_run``."""
        config_json = config if isinstance(config, str) else json.dumps(config, sort_keys=True)
        row = {
            "run_id": run_id,
            "config_json": config_json,
            "code_version": code_version,
            "model_source": model_source,
            "model_hash": model_hash,
        }
        return self.replace_partition("runs", {"run_id": run_id}, [row])

    def apply(self, change: Replacement) -> ReplaceResult:
        """Run one validated replacement inside the transaction."""
        call = f"replace_partition({change.spec.name!r}, {change.where!r})"
        if self._ended:
            raise WarehouseWriteError(f"{call} came after its transaction ended; open another with "
                                      "Warehouse.transaction()")
        if self._failed:
            raise WarehouseWriteError(f"{call} refused: {self._failed} failed earlier in this transaction, "
                                      "which is rolled back when its block ends")
        try:
            return _replace(self._con, change)
        except duckdb.Error as exc:
            self._failed = call
            raise WarehouseWriteError(
                f"{call} failed and was rolled back with the rest of its transaction; the old rows are kept. "
                f"DuckDB said: {exc}"
            ) from exc
        except BaseException:
            self._failed = call
            raise


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[Writes]:
    """Begin a transaction on ``con``, yield its ``Writes``, commit when the block ends.

    Any exception rolls everything back and propagates; a DuckDB error (at commit, say) becomes
    ``WarehouseWriteError`` carrying DuckDB's message.
    """
    writes = Writes(con)
    con.execute("BEGIN TRANSACTION")
    try:
        yield writes
        if writes._failed:  # the block caught the error; DuckDB would "commit" nothing without a word
            raise WarehouseWriteError(
                f"{writes._failed} failed inside the transaction, so none of its writes were committed "
                "(the old rows of every table are kept)"
            )
        con.execute("COMMIT")
    except duckdb.Error as exc:
        _rollback(con)
        raise WarehouseWriteError(
            "the transaction failed and was rolled back; the old rows of every table are kept. "
            f"DuckDB said: {exc}"
        ) from exc
    except BaseException:
        _rollback(con)
        raise
    finally:
        writes._ended = True


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass  # no transaction left to end (a failed COMMIT ends it); closing the connection discards any


def _replace(con: duckdb.DuckDBPyConnection, change: Replacement) -> ReplaceResult:
    spec, where, data = change.spec, change.where, change.data
    table = quote_ident(spec.name)
    if data.num_rows:
        con.register(_NEW_ROWS, data)
        try:
            _check_partition(con, spec, where, data)
        except duckdb.ConversionException as exc:
            raise ValueError(
                f"a `where` value does not fit its column's type in {spec.name!r}: {exc}"
            ) from exc
    keys = list(where)
    delete_sql = f"DELETE FROM {table} WHERE " + " AND ".join(
        f"{quote_ident(k)} = CAST(? AS {spec.column(k).type})" for k in keys
    )
    # Partition columns missing from the data come from `where`, as typed parameters.
    fill = [k for k in keys if k not in data.column_names]
    insert_cols = [*data.column_names, *fill]
    select_list = [quote_ident(c) for c in data.column_names]
    select_list += [f"CAST(? AS {spec.column(k).type})" for k in fill]
    insert_sql = (
        f"INSERT INTO {table} ({', '.join(quote_ident(c) for c in insert_cols)}) "
        f"SELECT {', '.join(select_list)} FROM {_NEW_ROWS}"
    )
    deleted = count_of(con.execute(delete_sql, [where[k] for k in keys]))
    inserted = 0
    if data.num_rows:
        inserted = count_of(con.execute(insert_sql, [where[k] for k in fill]))
        # Only on success: in a transaction DuckDB has aborted, unregistering fails too. The next
        # write of the transaction registers its own rows under the same name.
        con.unregister(_NEW_ROWS)
    return ReplaceResult(table=spec.name, where=where, rows_deleted=deleted, rows_inserted=inserted)


def _as_arrow(rows: Rows) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pa.RecordBatch):
        return pa.Table.from_batches([rows])
    if isinstance(rows, Mapping):
        return pa.table({name: _as_column(values) for name, values in rows.items()})
    if isinstance(rows, Sequence) and not isinstance(rows, str | bytes):
        return pa.Table.from_pylist(list(rows))
    raise TypeError(
        f"rows must be a pyarrow Table, a dict of columns or a list of row dicts, not {type(rows).__name__}"
    )


def _as_column(values: Any) -> Any:
    # A (n, h, w) numpy array is n row-major lists, the layout of top_images.heatmap.
    if isinstance(values, np.ndarray) and values.ndim >= 2:
        flat = np.ascontiguousarray(values.reshape(len(values), -1))
        offsets = np.arange(len(flat) + 1, dtype=np.int64) * flat.shape[1]
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(flat.reshape(-1)))
    return values


def _check_columns(spec: Table, data: pa.Table) -> None:
    names = data.column_names
    unknown = [c for c in names if c not in spec.column_names]
    if unknown:
        raise ValueError(
            f"table {spec.name!r} has no column(s) {', '.join(map(repr, unknown))}; "
            f"its columns are {', '.join(spec.column_names)}"
        )
    duplicated = sorted({c for c in names if names.count(c) > 1})
    if duplicated:
        raise ValueError(f"rows for {spec.name!r} carry column(s) {', '.join(duplicated)} more than once")


def _check_partition(
    con: duckdb.DuckDBPyConnection, spec: Table, where: Mapping[str, object], data: pa.Table
) -> None:
    """Raise ValueError if any new row lies outside the partition being replaced."""
    present = [k for k in where if k in data.column_names]
    if not present:
        return
    # TRY_CAST: a value that does not even convert to the column type is simply "outside".
    conditions = " OR ".join(
        f"TRY_CAST({quote_ident(k)} AS {spec.column(k).type}) IS DISTINCT FROM CAST(? AS {spec.column(k).type})"
        for k in present
    )
    select = ", ".join(quote_ident(k) for k in present)
    sql = f"SELECT count(*) OVER () AS n_bad, {select} FROM {_NEW_ROWS} WHERE {conditions} LIMIT 1"
    bad = con.execute(sql, [where[k] for k in present]).fetchall()
    if bad:
        n_bad, *values = bad[0]
        example = dict(zip(present, values, strict=True))
        raise ValueError(
            f"{n_bad} of {data.num_rows} new row(s) for {spec.name!r} lie outside the partition {dict(where)!r} "
            f"being replaced (e.g. {example!r}); pass rows of that partition only"
        )
