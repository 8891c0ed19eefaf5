"""storage: the Zarr activation store and the DuckDB warehouse (numpy/zarr/pyarrow/duckdb only).

Code outside the package imports from here: ``from storage import Warehouse, ActivationStore``.
Every error storage raises on purpose derives from ``StorageError``.

Names load on first use: the warehouse's readers (dashboards, ``tide sql``) never pay for importing
zarr (about 0.7 s), nor the activation store for duckdb.
"""

from __future__ import annotations

import importlib
from typing import Any

# The public names, by the module that defines them: the one list of the package's API.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "storage.activation_store": ("ActivationStore",),
    "storage.store_layout": ("StoreLayout", "ShardStats"),
    "storage.token_batches": ("StoreTokenBatch", "TokenSource", "BlockOrder", "shuffled_token_batches"),
    "storage.writer": ("BackgroundWriter", "WriterStats"),
    "storage.warehouse": ("Warehouse", "SaeRecord", "RelationInfo", "ColumnInfo"),
    "storage.writes": ("Writes", "ReplaceResult"),
    "storage.queries": ("Reads",),
    "storage.connection": ("connect",),
    "storage.schema": (
        "TABLES", "Table", "Col", "View", "SPLITS", "CONCEPT_KINDS", "TOP_IMAGE_SCOPES", "OVERALL_STEP",
    ),
    "storage.views": ("VIEWS", "SAE_CONTEXT"),
    "storage.export": ("write_table", "csv_bytes", "json_lines"),
    "storage.table_export": ("export_tables", "ExportedTable"),
    "storage.errors": (
        "StorageError", "StoreError", "StoreMismatchError", "WarehouseError", "WarehouseLockedError",
        "WarehouseMissingError", "WarehouseSchemaError", "WarehouseWriteError", "WarehouseQueryError",
        "WarehouseReadOnlyError", "UnknownSaeError",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
