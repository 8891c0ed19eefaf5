"""Query results to files: CSV, JSON Lines or Parquet (what ``tide sql --output`` writes).

CSV and JSON Lines are also what ``tide sql --format csv|json`` prints, so both come from the
serialisers here: a printed result and a written one are the same bytes.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Iterator, Mapping
from datetime import date, datetime
from datetime import time as dtime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

FileFormat = Literal["csv", "json", "parquet"]


def write_table(table: pa.Table, fmt: FileFormat, path: str | Path) -> Path:
    """Write a query result to ``path`` as parquet, csv (``csv_bytes``) or JSON Lines (``json_lines``)."""
    path = Path(path)
    if fmt not in ("csv", "json", "parquet"):
        raise ValueError(f"unknown output format {fmt!r}; use 'csv', 'json' or 'parquet'")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "csv":
        path.write_bytes(csv_bytes(table))
    else:
        with path.open("w", encoding="utf-8") as out:
            for line in json_lines(table):
                out.write(line + "\n")
    return path


def csv_bytes(table: pa.Table) -> bytes:
    """A header line then one line per row; list and struct values as JSON text."""
    # pyarrow's CSV writer cannot write nested values; JSON text keeps them round-trippable.
    columns = [
        pa.array([None if v is None else json.dumps(_jsonable(v)) for v in col.to_pylist()], pa.string())
        if pa.types.is_nested(col.type)
        else col
        for col in table.columns
    ]
    buffer = io.BytesIO()
    pa_csv.write_csv(pa.Table.from_arrays(columns, names=table.column_names), buffer)
    return buffer.getvalue()


def json_lines(table: pa.Table) -> Iterator[str]:
    """One JSON object per row, no newline: NaN and infinities become null, timestamps ISO 8601."""
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
