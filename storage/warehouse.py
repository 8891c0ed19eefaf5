"""The DuckDB warehouse: one ``warehouse.duckdb`` file of feature tables, written by the pipeline
and read with SQL by dashboards and ``tide sql``.

DuckDB lets one process at a time open a file that is being written, readers included (see
``storage.connection``). So nothing here holds a connection longer than one call or one ``with``
block: writers open, run one transaction and close; readers open read-only for one query or one
``reading()`` block. Opening retries on the lock error and then raises ``WarehouseLockedError``.

Writes replace partitions: delete a partition's rows and insert its new ones in one transaction
(``replace_partition``), or the partitions of several tables in one (``transaction()``), so a
failure or a crash leaves the old rows in place and re-running an asset is idempotent.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import duckdb
import pyarrow as pa

from storage.connection import DEFAULT_LOCK_TIMEOUT_S, REBUILD, connect, count_of
from storage.ddl import create_table_sql, quote_ident, table_comments_sql, table_spec, view_ddl
from storage.errors import (
    UnknownSaeError,
    WarehouseError,
    WarehouseLockedError,
    WarehouseMissingError,
    WarehouseQueryError,
    WarehouseReadOnlyError,
    WarehouseSchemaError,
    WarehouseWriteError,
)
from storage.queries import Params, Reads, fetch
from storage.schema import TABLES, TOP_IMAGE_SCOPES, Col
from storage.views import VIEWS
from storage.writes import Replacement, ReplaceResult, Rows, Writes, transaction

# What `from storage.warehouse import ...` offers: the warehouse, its records and the errors it raises.
__all__ = [
    "DEFAULT_LOCK_TIMEOUT_S",
    "ColumnInfo",
    "Reads",
    "RelationInfo",
    "ReplaceResult",
    "SaeRecord",
    "UnknownSaeError",
    "Warehouse",
    "WarehouseError",
    "WarehouseLockedError",
    "WarehouseMissingError",
    "WarehouseQueryError",
    "WarehouseReadOnlyError",
    "WarehouseSchemaError",
    "WarehouseWriteError",
    "Writes",
    "connect",
]


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


class Warehouse:
    """The warehouse file at ``path``; each call, or ``with`` block of ``reading()`` and ``transaction()``,
    opens and closes its own connection."""

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
            self._refuse_foreign(con)
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
                # A nullable column the code added since the file was built: added in place, NULL in the
                # rows already there (they predate it), so an upgrade keeps every row.
                for name, col in _addable_columns(con):
                    con.execute(f"ALTER TABLE {quote_ident(name)} ADD COLUMN {quote_ident(col.name)} {col.type}")
                drift = _schema_drift(con)
                if drift:
                    raise WarehouseSchemaError(
                        f"{self.path} was built with a different schema: {'; '.join(drift)}. "
                        "Delete the file (or `make clean`) and re-run the pipeline to rebuild it."
                    )
                # A list of allowed values the code has widened since (a new concept kind): every old row
                # is still allowed, so the table is rebuilt under the new CHECK with its rows.
                for name in _narrower_checks(con):
                    old = quote_ident(f"{name}__narrow")
                    con.execute(f"ALTER TABLE {quote_ident(name)} RENAME TO {old}")
                    con.execute(create_table_sql(TABLES[name]))
                    con.execute(f"INSERT INTO {quote_ident(name)} SELECT * FROM {old}")
                    con.execute(f"DROP TABLE {old}")
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

    @contextmanager
    def transaction(self) -> Iterator[Writes]:
        """One read-write connection and one transaction for several writes, committed together.

        ``with wh.transaction() as tx: tx.replace_partition(...); tx.replace_partition(...)``: each
        call validates and writes as ``Warehouse.replace_partition`` does, other connections see none
        of the new rows until the block ends, and then all of them. Any exception rolls back every
        table the block wrote (a DuckDB error raises ``WarehouseWriteError`` with DuckDB's message);
        a crash leaves nothing, as DuckDB keeps only committed transactions. The file stays locked
        for the whole block, readers included (``query`` inside it waits for the block, then times
        out), so compute the rows first and keep the block to the writes. Creates the schema on
        first use.
        """
        if not self._schema_ready:
            self.init_schema()
        with self._connection(read_only=False) as con, transaction(con) as writes:
            yield writes

    def replace_partition(self, table: str, where: Mapping[str, object], rows: Rows) -> ReplaceResult:
        """Replace the rows of ``table`` matching ``where`` by ``rows``, atomically.

        ``where`` maps columns to values, e.g. ``{"sae_id": "l3_topk"}``; every new row must carry
        exactly those values (a partition column missing from ``rows`` is filled in from ``where``).
        ``rows`` is a pyarrow Table/RecordBatch, a dict of columns (lists or numpy arrays; a 2-D or
        higher array becomes one list per row, trailing axes flattened row-major) or a list of row
        dicts. Columns absent from ``rows`` get their default (NULL). Delete and insert run in one
        transaction: on any failure (duplicate grain, type error, constraint) it is rolled back, the
        old rows stay, and ``WarehouseWriteError`` carries DuckDB's message. Creates the schema on
        first use. To replace partitions of several tables at once, use ``transaction()``.
        """
        change = Replacement.of(table, where, rows)  # bad names fail before the file is opened
        with self.transaction() as tx:
            return tx.apply(change)

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
        with self.transaction() as tx:
            return tx.upsert_run(
                run_id, config, code_version=code_version, model_source=model_source, model_hash=model_hash
            )

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
            try:
                yield Reads(con)
            except WarehouseQueryError as err:
                if "does not exist" in err.duckdb_message:  # no such table: maybe no table of ours at all
                    self._refuse_foreign(con)
                raise

    def _refuse_foreign(self, con: duckdb.DuckDBPyConnection) -> None:
        """A DuckDB file with tables, none of them the warehouse's, is someone else's database: writing our
        tables into it or reading it as ours would mix the two."""
        names = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' AND NOT internal").fetchall()]
        if names and not set(names) & set(TABLES):
            raise WarehouseSchemaError(
                f"{self.path} is a DuckDB database but not a TIDE warehouse: it holds {', '.join(sorted(names)[:8])} "
                f"and none of the warehouse's tables ({', '.join(TABLES)}). Point warehouse.root at another "
                f"folder, or move the file away and build the warehouse with `{REBUILD}`")

    # The CLI's name for the same thing: `query` never writes.
    readonly_query = query

    def schema(self) -> list[RelationInfo]:
        """Every table, then every view, with comment (a table's starts with its grain) and columns."""
        with self._connection(read_only=True) as con:
            relations = fetch(
                con,
                "SELECT table_name AS name, 'table' AS kind, comment FROM duckdb_tables() "
                "WHERE database_name = current_database() AND schema_name = 'main' AND NOT internal "
                "UNION ALL "
                "SELECT view_name, 'view', comment FROM duckdb_views() "
                "WHERE database_name = current_database() AND schema_name = 'main' AND NOT internal "
                "ORDER BY kind, name",
            ).to_pylist()
            columns = fetch(
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
        spec = table_spec(table)
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


def _drifted_empty_tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    actual = _actual_columns(con)
    return [name for name, spec in TABLES.items()
            if name in actual and list(spec.column_names) != actual[name]
            and count_of(con.execute(f"SELECT count(*) FROM {quote_ident(name)}")) == 0]


def _addable_columns(con: duckdb.DuckDBPyConnection) -> list[tuple[str, Col]]:
    """(table, column) pairs the code declares and an existing table lacks, where NULL is a valid value
    for old rows: not part of the grain, no NOT NULL, no CHECK."""
    actual = _actual_columns(con)
    return [(name, col) for name, spec in TABLES.items() if name in actual for col in spec.columns
            if col.name not in actual[name] and col.name not in spec.grain and not col.constraint]


def _narrower_checks(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Tables whose file has a column CHECK that lacks a quoted value the code's CHECK allows (the code only
    ever widens such lists)."""
    stored = con.execute(
        "SELECT table_name, constraint_column_names[1], expression FROM duckdb_constraints() "
        "WHERE database_name = current_database() AND constraint_type = 'CHECK' "
        "AND len(constraint_column_names) = 1").fetchall()
    have = {(t, c): expr for t, c, expr in stored}
    out = []
    for name, spec in TABLES.items():
        for col in spec.columns:
            expr = have.get((name, col.name))
            wanted = re.findall(r"'[^']*'", col.constraint)
            if expr is not None and wanted and not set(wanted) <= set(re.findall(r"'[^']*'", expr)):
                out.append(name)
                break
    return out


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
