"""pipelines: the only package that imports dagster. Assets are thin and call tide_core / storage."""
