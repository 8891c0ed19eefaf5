"""storage: the Zarr activation store and the DuckDB warehouse (numpy/zarr/pyarrow/duckdb only)."""
