"""dashboards: the feature browser. Reads the warehouse (storage) only; never torch or tide_core."""
