"""The DuckDB warehouse: one ``warehouse.duckdb`` file of feature tables, written by the pipeline
and read with SQL by dashboards and ``tide sql``.

DuckDB lets only one process open a file while it is open read-write; every other process, even a
read-only one, fails with "Could not set lock on file" (a ``duckdb.IOException``). So nothing here
holds a connection longer than one call: writers open, run one transaction and close; readers open
read-only for one query. Opening retries on the lock error with backoff up to ``timeout_s`` and then
raises ``WarehouseLockedError`` naming the file.

Writes go through ``Warehouse.replace_partition``: delete a partition, insert its new rows, one
transaction, so a failure leaves the old rows in place and re-running an asset is idempotent.
"""

from __future__ import annotations

import base64
import difflib
import io
import json
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as dtime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from storage.schema import (
    TABLES,
    TOP_IMAGE_SCOPES,
    VIEWS,
    Table,
    create_table_sql,
    quote_ident,
    table_comments_sql,
    view_ddl,
)

DEFAULT_LOCK_TIMEOUT_S = 60.0
_MAX_BACKOFF_S = 1.0
_NEW_ROWS = "_tide_new_rows"  # name the incoming Arrow table is registered under during a write

# Statement kinds `query` runs; anything else (INSERT, COPY ... TO, ATTACH, SET, ...) is refused
# before opening, because a read-only connection still lets COPY and ATTACH write other files.
_READ_STATEMENTS = frozenset(
    {
        duckdb.StatementType.SELECT,
        duckdb.StatementType.EXPLAIN,
        duckdb.StatementType.PRAGMA,
        duckdb.StatementType.CALL,
    }
)

Rows = pa.Table | pa.RecordBatch | Mapping[str, Any] | Sequence[Mapping[str, Any]]
Params = Sequence[object] | Mapping[str, object] | None
TextFormat = Literal["table", "csv", "json"]
FileFormat = Literal["csv", "json", "parquet"]


# --------------------------------------------------------------------------------------- errors


class WarehouseError(Exception):
    """Base of every error this module raises on purpose."""


class WarehouseLockedError(WarehouseError, TimeoutError):
    """Another process held the database file for longer than the lock timeout."""


class WarehouseMissingError(WarehouseError, FileNotFoundError):
    """A read was asked of a warehouse file that does not exist yet."""


class WarehouseSchemaError(WarehouseError):
    """The file's tables do not match ``storage.schema`` (it was built by other code)."""


class WarehouseWriteError(WarehouseError):
    """A write failed inside its transaction and was rolled back; the old rows are kept."""


class WarehouseQueryError(WarehouseError):
    """A query failed; ``duckdb_message`` is DuckDB's own text."""

    def __init__(self, message: str, *, duckdb_message: str = "", sql: str = ""):
        super().__init__(message)
        self.duckdb_message = duckdb_message
        self.sql = sql


class WarehouseReadOnlyError(WarehouseQueryError):
    """A query tried to write: reads go through read-only connections."""


class UnknownSaeError(WarehouseError, KeyError):
    """No SAE with that id; the message lists the close matches and the known ids."""

    def __str__(self) -> str:  # KeyError would print the repr of the message, quotes and all
        return str(self.args[0])


# -------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ReplaceResult:
    table: str
    where: dict[str, object]
    rows_deleted: int
    rows_inserted: int


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    type: str
    comment: str | None


@dataclass(frozen=True)
class RelationInfo:
    """One table or view as ``tide sql --schema`` lists it; ``grain`` is empty for views."""

    name: str
    kind: Literal["table", "view"]
    comment: str | None
    grain: tuple[str, ...]
    columns: tuple[ColumnInfo, ...]


@dataclass(frozen=True)
class SaeRecord:
    """One row of ``saes``."""

    sae_id: str
    run_id: str
    layer: int
    site: str
    variant: str
    n_latents: int
    k: int | None
    path: str | None
    tokens_seen: int | None
    created_at: datetime


# ---------------------------------------------------------------------------------- connections


def _is_lock_error(exc: duckdb.Error) -> bool:
    # Another process holding the file: IOException "Could not set lock on file ...". This process
    # already holding it in the other mode (read-only vs read-write): ConnectionException
    # "... different configuration than existing connections"; it clears when that connection closes.
    text = str(exc).lower()
    if isinstance(exc, duckdb.IOException):
        return "lock" in text
    return isinstance(exc, duckdb.ConnectionException) and "different configuration" in text


def connect(
    path: str | Path, *, read_only: bool, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
) -> duckdb.DuckDBPyConnection:
    """Open the database file, retrying while another process holds its lock.

    Retries with exponential backoff (50 ms doubling to 1 s, jittered so competing writers do not
    retry in lockstep) until ``timeout_s`` has passed, then raises ``WarehouseLockedError``. A
    read-only open of a missing file raises ``WarehouseMissingError`` at once; a read-write open
    creates the file and its parent folder. The caller closes the connection (``with`` works).
    """
    path = Path(path)
    if read_only and not path.exists():
        raise WarehouseMissingError(
            f"no warehouse at {path}: nothing has been written there yet. Run the pipeline to build it, "
            "or point to an existing warehouse.duckdb."
        )
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as exc:
            if not _is_lock_error(exc):
                raise WarehouseError(f"could not open {path}: {exc}") from exc
            last = str(exc)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            mode = "read-only" if read_only else "read-write"
            raise WarehouseLockedError(
                f"could not open {path} {mode} within {timeout_s:g} s: another process holds it "
                "(DuckDB lets one process at a time open a file that is being written, readers included). "
                "Wait for that process, e.g. a running pipeline, to finish, or raise the lock timeout. "
                f"DuckDB said: {last}"
            )
        time.sleep(min(delay * random.uniform(0.5, 1.0), remaining))
        delay = min(delay * 2, _MAX_BACKOFF_S)


# ------------------------------------------------------------------------------------ warehouse


class Reads:
    """Read-only queries on one open connection: ``Warehouse.reading``."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self._con = con

    def query(self, sql: str, params: Params = None) -> pa.Table:
        """As ``Warehouse.query``."""
        _refuse_writes(sql)
        if isinstance(params, Mapping):
            params = {name: _plain(value) for name, value in params.items()}
        elif params is not None:
            params = [_plain(value) for value in params]
        return _fetch(self._con, sql, params)


class Warehouse:
    """The warehouse file at ``path``; every method opens and closes its own connection."""

    def __init__(self, path: str | Path, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S):
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self._schema_ready = False

    def __repr__(self) -> str:
        return f"Warehouse({str(self.path)!r})"

    def exists(self) -> bool:
        return self.path.exists()

    @contextmanager
    def _connection(self, *, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        con = connect(self.path, read_only=read_only, timeout_s=self.lock_timeout_s)
        try:
            yield con
        finally:
            con.close()

    # ------------------------------------------------------------------------------- writing

    def init_schema(self) -> None:
        """Create every table (IF NOT EXISTS) and (re)create every view; safe to call repeatedly."""
        with self._connection(read_only=False) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                for table in TABLES.values():
                    con.execute(create_table_sql(table))
                # Compare with the code's schema before anything else touches the columns: on a file
                # built by older code, a column comment or a view's binder error would hide the real
                # problem, a table missing a column.
                # An empty table built by older code holds nothing to lose: rebuild it in place.
                for name in _drifted_empty_tables(con):
                    con.execute(f"DROP TABLE {quote_ident(name)}")
                    con.execute(create_table_sql(TABLES[name]))
                drift = _schema_drift(con)
                if drift:
                    raise WarehouseSchemaError(
                        f"{self.path} was built with a different schema: {'; '.join(drift)}. "
                        "Delete the file (or `make clean`) and re-run the pipeline to rebuild it."
                    )
                for table in TABLES.values():
                    for stmt in table_comments_sql(table):
                        con.execute(stmt)
                for view in VIEWS.values():
                    for stmt in view_ddl(view):
                        con.execute(stmt)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        self._schema_ready = True

    def replace_partition(self, table: str, where: Mapping[str, object], rows: Rows) -> ReplaceResult:
        """Replace the rows of ``table`` matching ``where`` by ``rows``, atomically.

        ``where`` maps columns to values, e.g. ``{"sae_id": "l3_topk"}``; every new row must carry
        exactly those values (a partition column missing from ``rows`` is filled in from ``where``).
        ``rows`` is a pyarrow Table/RecordBatch, a dict of columns (lists or numpy arrays; a 2-D or
        higher array becomes one list per row, trailing axes flattened row-major) or a list of row
        dicts. Columns absent from ``rows`` get their default (NULL). Delete and insert run in one
        transaction: on any failure (duplicate grain, type error, constraint) it is rolled back, the
        old rows stay, and ``WarehouseWriteError`` carries DuckDB's message. Creates the schema on
        first use.
        """
        spec = _table_spec(table)
        where = {key: _plain(value) for key, value in where.items()}
        if not where:
            raise ValueError(
                f"replace_partition({table!r}) needs at least one partition column in `where`, e.g. "
                f"{{{spec.grain[0]!r}: ...}}; an empty `where` would replace the whole table"
            )
        for key, value in where.items():
            if key not in spec.column_names:
                raise ValueError(
                    f"`where` names column {key!r}, which table {table!r} lacks; "
                    f"its columns are {', '.join(spec.column_names)}"
                )
            if value is None:
                raise ValueError(f"`where[{key!r}]` is None; a partition is selected by concrete values")
        data = _as_arrow(rows)
        _check_columns(spec, data)

        if not self._schema_ready:
            self.init_schema()
        keys = list(where)
        key_params = [where[k] for k in keys]
        with self._connection(read_only=False) as con:
            if data.num_rows:
                con.register(_NEW_ROWS, data)
                try:
                    _check_partition(con, spec, where, data)
                except duckdb.ConversionException as exc:
                    raise ValueError(
                        f"a `where` value does not fit its column's type in {table!r}: {exc}"
                    ) from exc
            delete_sql = f"DELETE FROM {quote_ident(table)} WHERE " + " AND ".join(
                f"{quote_ident(k)} = CAST(? AS {spec.column(k).type})" for k in keys
            )
            # Partition columns missing from the data come from `where`, as typed parameters.
            fill = [k for k in keys if k not in data.column_names]
            insert_cols = [*data.column_names, *fill]
            select_list = [quote_ident(c) for c in data.column_names]
            select_list += [f"CAST(? AS {spec.column(k).type})" for k in fill]
            insert_sql = (
                f"INSERT INTO {quote_ident(table)} ({', '.join(quote_ident(c) for c in insert_cols)}) "
                f"SELECT {', '.join(select_list)} FROM {_NEW_ROWS}"
            )
            con.execute("BEGIN TRANSACTION")
            try:
                deleted = _count(con.execute(delete_sql, key_params))
                inserted = _count(con.execute(insert_sql, [where[k] for k in fill])) if data.num_rows else 0
                con.execute("COMMIT")
            except duckdb.Error as exc:
                con.execute("ROLLBACK")
                raise WarehouseWriteError(
                    f"replace_partition({table!r}, {where!r}) failed and was rolled back; the old rows "
                    f"are kept. DuckDB said: {exc}"
                ) from exc
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return ReplaceResult(table=table, where=where, rows_deleted=deleted, rows_inserted=inserted)

    def upsert_run(
        self,
        run_id: str,
        config: str | Mapping[str, Any],
        *,
        code_version: str | None = None,
        model_source: str | None = None,
        model_hash: str | None = None,
    ) -> ReplaceResult:
        """Write (or overwrite) the ``runs`` row of ``run_id``; created_at becomes now (UTC)."""
        config_json = config if isinstance(config, str) else json.dumps(config, sort_keys=True)
        row = {
            "run_id": run_id,
            "config_json": config_json,
            "code_version": code_version,
            "model_source": model_source,
            "model_hash": model_hash,
        }
        return self.replace_partition("runs", {"run_id": run_id}, [row])

    # ------------------------------------------------------------------------------- reading

    def query(self, sql: str, params: Params = None) -> pa.Table:
        """Run read-only SQL and return the last statement's result as a pyarrow Table.

        Values belong in ``params`` (``?`` with a list, ``$name`` with a dict), never pasted into
        ``sql``. Write statements raise ``WarehouseReadOnlyError``; DuckDB errors (syntax, unknown
        table) raise ``WarehouseQueryError`` carrying DuckDB's text.
        """
        with self.reading() as reads:
            return reads.query(sql, params)

    @contextmanager
    def reading(self) -> Iterator[Reads]:
        """Several ``query`` calls on one read-only connection (opening one costs ~16 ms); a writer waits
        for the block to end, so keep it short."""
        with self._connection(read_only=True) as con:
            yield Reads(con)

    # The CLI's name for the same thing: `query` never writes.
    readonly_query = query

    def schema(self) -> list[RelationInfo]:
        """Every table, then every view, with comment (a table's starts with its grain) and columns."""
        with self._connection(read_only=True) as con:
            relations = _fetch(
                con,
                "SELECT table_name AS name, 'table' AS kind, comment FROM duckdb_tables() "
                "WHERE database_name = current_database() AND schema_name = 'main' AND NOT internal "
                "UNION ALL "
                "SELECT view_name, 'view', comment FROM duckdb_views() "
                "WHERE database_name = current_database() AND schema_name = 'main' AND NOT internal "
                "ORDER BY kind, name",
            ).to_pylist()
            columns = _fetch(
                con,
                "SELECT table_name, column_name, data_type, comment FROM duckdb_columns() "
                "WHERE database_name = current_database() AND schema_name = 'main' "
                "ORDER BY table_name, column_index",
            ).to_pylist()
        by_relation: dict[str, list[ColumnInfo]] = {}
        for c in columns:
            by_relation.setdefault(c["table_name"], []).append(
                ColumnInfo(c["column_name"], c["data_type"], c["comment"])
            )
        return [
            RelationInfo(
                name=r["name"],
                kind=r["kind"],
                comment=r["comment"],
                grain=TABLES[r["name"]].grain if r["name"] in TABLES else (),
                columns=tuple(by_relation.get(r["name"], ())),
            )
            for r in relations
        ]

    def check_grain(self, table: str) -> int:
        """Rows beyond the first per grain key, i.e. how many rows break the grain (0 expected)."""
        spec = _table_spec(table)
        keys = ", ".join(quote_ident(g) for g in spec.grain)
        result = self.query(
            "SELECT CAST(coalesce(sum(n - 1), 0) AS BIGINT) AS extra FROM "
            f"(SELECT count(*) AS n FROM {quote_ident(table)} GROUP BY {keys} HAVING count(*) > 1)"
        )
        return int(result.column(0)[0].as_py())

    def known_sae_ids(self) -> list[str]:
        return [str(v) for v in self.query("SELECT sae_id FROM saes ORDER BY sae_id").column(0).to_pylist()]

    def require_sae(self, sae_id: str) -> SaeRecord:
        """The ``saes`` row of ``sae_id``; ``UnknownSaeError`` lists close and valid ids otherwise."""
        rows = self.query("SELECT * FROM saes WHERE sae_id = ?", [sae_id]).to_pylist()
        if rows:
            return SaeRecord(**rows[0])
        known = self.known_sae_ids()
        if not known:
            raise UnknownSaeError(f"no SAE {sae_id!r} in {self.path}: it holds no SAEs yet; train some first")
        close = difflib.get_close_matches(sae_id, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
        raise UnknownSaeError(f"no SAE {sae_id!r} in {self.path}.{hint} Known SAEs: {shown}")

    def feature(self, sae_id: str, feature_id: int) -> dict:
        """The ``v_features`` row of one feature; clear errors for an unknown SAE or feature id."""
        sae = self.require_sae(sae_id)
        if not 0 <= int(feature_id) < sae.n_latents:
            raise ValueError(f"feature {feature_id} does not exist: SAE {sae_id} has features 0..{sae.n_latents - 1}")
        rows = self.query("SELECT * FROM v_features WHERE sae_id = ? AND feature_id = ?",
                          [sae_id, int(feature_id)]).to_pylist()
        if not rows:
            raise ValueError(f"no statistics for SAE {sae_id} yet: materialize `feature_stats` for layer {sae.layer}")
        return rows[0]

    def top_images(self, sae_id: str, feature_id: int, scope: str = "overall", limit: int = 20) -> pa.Table:
        """The strongest ``limit`` images of one feature (``v_top_images``), rank order."""
        if scope not in TOP_IMAGE_SCOPES:
            raise ValueError(f"scope {scope!r}: use one of {', '.join(TOP_IMAGE_SCOPES)}")
        rows = self.query("SELECT * FROM v_top_images WHERE sae_id = ? AND feature_id = ? AND scope = ? "
                          "ORDER BY rank LIMIT ?", [sae_id, int(feature_id), scope, int(limit)])
        if rows.num_rows == 0:
            self.feature(sae_id, feature_id)  # an unknown SAE or feature id raises its own clear error
        return rows


# ------------------------------------------------------------------------------------ internals


def _table_spec(table: str) -> Table:
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(
            f"unknown table {table!r}; the warehouse tables are {', '.join(TABLES)}"
            + (" (views are read-only)" if table in VIEWS else "")
        ) from None


def _drifted_empty_tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    actual = _actual_columns(con)
    return [name for name, spec in TABLES.items()
            if name in actual and list(spec.column_names) != actual[name]
            and _count(con.execute(f"SELECT count(*) FROM {quote_ident(name)}")) == 0]


def _actual_columns(con: duckdb.DuckDBPyConnection) -> dict[str, list[str]]:
    rows = con.execute(
        "SELECT table_name, list(column_name ORDER BY column_index) FROM duckdb_columns() "
        "WHERE database_name = current_database() AND schema_name = 'main' GROUP BY table_name"
    ).fetchall()
    return dict(rows)


def _schema_drift(con: duckdb.DuckDBPyConnection) -> list[str]:
    actual = _actual_columns(con)
    problems = []
    for name, spec in TABLES.items():
        have = actual.get(name, [])
        missing = [c for c in spec.column_names if c not in have]
        extra = [c for c in have if c not in spec.column_names]
        if missing:
            problems.append(f"table {name} lacks {', '.join(missing)}")
        if extra:
            problems.append(f"table {name} has columns the code does not know: {', '.join(extra)}")
    return problems


def _plain(value: object) -> object:
    # DuckDB cannot bind numpy scalars (np.int64(3)) as parameters; their Python equivalents bind.
    return value.item() if isinstance(value, np.generic) else value


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


def _count(result: duckdb.DuckDBPyConnection) -> int:
    row = result.fetchone()
    return int(row[0]) if row else 0


def _refuse_writes(sql: str) -> None:
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise WarehouseQueryError(f"invalid SQL: {exc}", duckdb_message=str(exc), sql=sql) from exc
    if not statements:
        raise WarehouseQueryError("empty query: give at least one SELECT statement", sql=sql)
    for statement in statements:
        if statement.type not in _READ_STATEMENTS:
            kind = statement.type.name.replace("_", " ")
            raise WarehouseReadOnlyError(
                f"the warehouse is opened read-only: tide sql runs queries, not writes (got a {kind} "
                "statement). Tables are written by the pipeline; use SELECT, or COPY the result with "
                "--output instead.",
                sql=sql,
            )


def _fetch(con: duckdb.DuckDBPyConnection, sql: str, params: Params = None) -> pa.Table:
    try:
        relation = con.sql(sql, params=params)
        # Statements with no result (none get past _refuse_writes today) yield None.
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.Error as exc:
        text = str(exc)
        if "read-only" in text:
            raise WarehouseReadOnlyError(
                f"the warehouse is opened read-only: tide sql runs queries, not writes. DuckDB said: {text}",
                duckdb_message=text,
                sql=sql,
            ) from exc
        hint = ""
        if isinstance(exc, duckdb.CatalogException):
            hint = " (`tide sql --schema` lists the tables, views and columns)"
        raise WarehouseQueryError(f"{text}{hint}", duckdb_message=text, sql=sql) from exc


# ---------------------------------------------------------------------------------- formatting

_MAX_CELL = 40
_LIST_PREVIEW = 4


def format_table(table: pa.Table, fmt: TextFormat = "table", max_rows: int | None = 50) -> str:
    """Render a query result for a terminal.

    ``table``: aligned text, at most ``max_rows`` rows with a note of how many were left out, long
    text and lists shortened. ``csv``: a header line then one line per row, list and struct values
    as JSON text. ``json``: JSON Lines, one object per row (NaN becomes null, timestamps ISO 8601).
    ``max_rows`` applies to ``table`` only: csv and json are for machines and always complete.
    """
    if fmt == "csv":
        return _csv_bytes(table).decode()
    if fmt == "json":
        return "".join(line + "\n" for line in _json_lines(table))
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; use 'table', 'csv' or 'json'")
    return _text_table(table, max_rows)


def write_table(table: pa.Table, fmt: FileFormat, path: str | Path) -> Path:
    """Write a query result to ``path`` as parquet, csv (as format_table) or JSON Lines."""
    path = Path(path)
    if fmt not in ("csv", "json", "parquet"):
        raise ValueError(f"unknown output format {fmt!r}; use 'csv', 'json' or 'parquet'")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "csv":
        path.write_bytes(_csv_bytes(table))
    else:
        with path.open("w", encoding="utf-8") as out:
            for line in _json_lines(table):
                out.write(line + "\n")
    return path


def _is_nested(type_: pa.DataType) -> bool:
    return pa.types.is_nested(type_)


def _csv_bytes(table: pa.Table) -> bytes:
    # pyarrow's CSV writer cannot write nested values; JSON text keeps them round-trippable.
    columns = [
        pa.array([None if v is None else json.dumps(_jsonable(v)) for v in col.to_pylist()], pa.string())
        if _is_nested(col.type)
        else col
        for col in table.columns
    ]
    buffer = io.BytesIO()
    pa_csv.write_csv(pa.Table.from_arrays(columns, names=table.column_names), buffer)
    return buffer.getvalue()


def _json_lines(table: pa.Table) -> Iterator[str]:
    names = table.column_names
    columns = [col.to_pylist() for col in table.columns]
    for values in zip(*columns, strict=True):
        yield json.dumps({n: _jsonable(v) for n, v in zip(names, values, strict=True)}, allow_nan=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime | date | dtime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        head = ", ".join(_cell(v) for v in value[:_LIST_PREVIEW])
        return f"[{head}, … {len(value)} items]" if len(value) > _LIST_PREVIEW else f"[{head}]"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    text = str(value).replace("\n", " ")
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"


def _text_table(table: pa.Table, max_rows: int | None) -> str:
    if table.num_columns == 0:
        return "(no result)\n"
    total = table.num_rows
    shown = table if max_rows is None else table.slice(0, max_rows)
    names = table.column_names
    cells = [[_cell(v) for v in col.to_pylist()] for col in shown.columns]
    numeric = [
        pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
        for t in table.schema.types
    ]
    widths = [max([len(n), *map(len, col)]) for n, col in zip(names, cells, strict=True)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(names), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in zip(*cells, strict=True)]
    if shown.num_rows < total:
        out.append(f"({shown.num_rows} of {total} rows shown; the rest are left out)")
    else:
        out.append(f"({total} row{'' if total == 1 else 's'})")
    return "\n".join(out) + "\n"
