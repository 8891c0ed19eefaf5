"""Query results as terminal text: the formatting of ``tide sql``.

The aligned text table is the CLI's own; CSV and JSON Lines come from ``storage`` (the serialisers
``tide sql --output`` writes files with), so a printed result and a written one are the same bytes.
Imports pyarrow, the standard library and ``storage`` only, nothing else of ``pipelines``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import pyarrow as pa

from storage import csv_bytes, json_lines

TextFormat = Literal["table", "csv", "json"]

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
        return csv_bytes(table).decode()
    if fmt == "json":
        return "".join(line + "\n" for line in json_lines(table))
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; use 'table', 'csv' or 'json'")
    return _text_table(table, max_rows)


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
