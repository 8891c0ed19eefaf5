"""tide_core: pure torch/numpy parts of the TIDE warehouse (models, sampling, capture, SAEs, metrics).

Imports nothing else of the project and never dagster, zarr or duckdb.
"""

__version__ = "0.1.0"
