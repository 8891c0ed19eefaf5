"""Reading the warehouse: read-only SQL on one open connection, results as pyarrow Tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import duckdb
import pyarrow as pa

from storage.connection import bindable
from storage.errors import WarehouseQueryError, WarehouseReadOnlyError

Params = Sequence[object] | Mapping[str, object] | None

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


class Reads:
    """Read-only queries on one open connection: ``Warehouse.reading``."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self._con = con

    def query(self, sql: str, params: Params = None) -> pa.Table:
        """As ``Warehouse.query``."""
        refuse_writes(sql)
        if isinstance(params, Mapping):
            params = {name: bindable(value) for name, value in params.items()}
        elif params is not None:
            params = [bindable(value) for value in params]
        return fetch(self._con, sql, params)


def refuse_writes(sql: str) -> None:
    """Raise ``WarehouseReadOnlyError`` unless every statement of ``sql`` only reads."""
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


def fetch(con: duckdb.DuckDBPyConnection, sql: str, params: Params = None) -> pa.Table:
    """The last statement's result; DuckDB errors become ``WarehouseQueryError`` with its text."""
    try:
        relation = con.sql(sql, params=params)
        # Statements with no result (none get past refuse_writes) yield None.
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
