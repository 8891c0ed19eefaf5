"""Every warehouse table as one Parquet file (``tide export --format parquet DIR``), readable without this
package: DuckDB (``SELECT * FROM 'DIR/features.parquet'``), pandas, polars, Spark.

Each file carries what the DDL comment says in DuckDB: the schema metadata holds the table's name, grain
(the columns that identify a row, as a JSON list) and description, and every field its column's doc. Rows
are ordered by the grain, so two exports of the same warehouse are the same files. A table an older file
lacks is written empty with its declared columns, so a reader finds every table.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from storage.ddl import quote_ident
from storage.schema import TABLES, Table

if TYPE_CHECKING:
    from storage.warehouse import Warehouse

# Schema metadata keys of an exported file (bytes, as Parquet stores them).
TABLE_KEY, GRAIN_KEY, DESCRIPTION_KEY = b"tide.table", b"tide.grain", b"tide.description"


@dataclass(frozen=True)
class ExportedTable:
    name: str
    path: Path | str  # a local path, or the object's URL
    rows: int


def export_tables(wh: Warehouse, directory: str | Path) -> list[ExportedTable]:
    """Write ``<directory>/<table>.parquet`` for every table of ``storage.schema.TABLES``; ``directory`` is a
    local folder or any fsspec URL (``s3://bucket/tables``: one object per table)."""
    fs, root = fsspec.core.url_to_fs(str(directory))
    fs.makedirs(root, exist_ok=True)
    local = isinstance(fs, LocalFileSystem)
    written = []
    with wh.reading() as reads:
        present = {r["name"] for r in reads.query(
            "SELECT table_name AS name FROM duckdb_tables() WHERE schema_name = 'main'").to_pylist()}
        for table in TABLES.values():
            data = with_table_metadata(reads.query(_select(table, exists=table.name in present)), table)
            if local:
                path = Path(root) / f"{table.name}.parquet"
                _write_atomic(data, path)
            else:  # an object store puts a whole object at once: no half file to hide
                path = f"{str(directory).rstrip('/')}/{table.name}.parquet"
                with fs.open(f"{root}/{table.name}.parquet", "wb") as f:
                    pq.write_table(data, f)
            written.append(ExportedTable(table.name, path, data.num_rows))
    return written


def with_table_metadata(data: pa.Table, table: Table) -> pa.Table:
    """``data`` with the table's grain and description on its schema and each column's doc on its field."""
    docs = {c.name: c.doc for c in table.columns}
    fields = [f.with_metadata({b"description": docs[f.name].encode()}) if docs.get(f.name) else f
              for f in data.schema]
    meta = {TABLE_KEY: table.name.encode(), GRAIN_KEY: json.dumps(list(table.grain)).encode(),
            DESCRIPTION_KEY: table.grain_doc.encode()}
    return data.cast(pa.schema(fields, metadata=meta))


def _select(table: Table, *, exists: bool) -> str:
    if not exists:  # no rows, but the declared columns and types
        cols = ", ".join(f"CAST(NULL AS {c.type}) AS {quote_ident(c.name)}" for c in table.columns)
        return f"SELECT {cols} LIMIT 0"
    order = ", ".join(quote_ident(c) for c in table.grain)
    return f"SELECT * FROM {quote_ident(table.name)} ORDER BY {order}"


def _write_atomic(data: pa.Table, path: Path) -> None:
    """A reader never sees half a file: write beside it, then rename over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(data, tmp)
    os.replace(tmp, path)
