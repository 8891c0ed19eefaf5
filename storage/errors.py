"""Every error storage raises on purpose, under one root: ``except StorageError`` catches them all.

Each also keeps the built-in base its callers may already catch (``StoreError`` is a ``ValueError``,
``WarehouseLockedError`` a ``TimeoutError``, ``UnknownSaeError`` a ``KeyError``, ...). Messages say
what to change. Invalid arguments (an unknown table or column, a malformed ``where``, a feature id out
of range) raise plain ``ValueError`` or ``TypeError``, as any Python call does.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error storage raises on purpose: the activation store's and the warehouse's."""


# ------------------------------------------------------------------------------ activation store


class StoreError(StorageError, ValueError):
    """The activation store cannot be used as asked; the message says what to change."""


class StoreMismatchError(StoreError):
    """An existing store was written with a different configuration."""


# ------------------------------------------------------------------------------------ warehouse


class WarehouseError(StorageError):
    """Base of every error the DuckDB warehouse raises on purpose."""


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
