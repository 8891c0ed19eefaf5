"""Asset factories: each takes the Project (partitions depend on the config) and returns definitions."""
