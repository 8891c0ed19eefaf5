"""Where things live for one config: resolved once, used by the run context, the CLI and tests (no Dagster).

Everything a warehouse holds lives under its root, the Dagster instance included, so runs of two configs
(two roots) never mix and deleting a root deletes its history with it:

    <root>/warehouse.duckdb      the feature tables
    <root>/activations.zarr      the activation store (unless warehouse.store_url points elsewhere)
    <root>/.dagster/             the Dagster instance (runs, materializations, data versions)
    <root>/judge/ saes/ features/ edits/ dashboard/
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tide_core import __version__
from tide_core.config import TideConfig, load_config, resolve_config_path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Project:
    """A loaded config (every path in it absolute) plus the paths derived from it."""

    config: TideConfig
    config_path: Path | None

    @classmethod
    def load(cls, config_path: str | Path | None = None) -> Project:
        path = resolve_config_path(config_path)
        return cls(config=load_config(path), config_path=path.resolve() if path else None)

    @property
    def root(self) -> Path:
        return Path(self.config.warehouse.root)

    @property
    def store_url(self) -> str:
        return self.config.warehouse.store_url or str(self.root / "activations.zarr")

    @property
    def duckdb_path(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def dagster_home(self) -> Path:
        return self.root / ".dagster"

    @property
    def judge_dir(self) -> Path:
        return self.root / "judge"

    @property
    def saes_dir(self) -> Path:
        return self.root / "saes"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def edits_dir(self) -> Path:
        return self.root / "edits"

    @property
    def num_shards(self) -> int:
        s = self.config.sampling
        return -(-s.num_samples // s.shard_size)

    def shard_keys(self) -> list[str]:
        return [f"{i:05d}" for i in range(self.num_shards)]

    def layer_keys(self) -> list[str]:
        return [f"{layer:02d}" for layer in sorted(self.config.capture.layers)]


def content_key(description: object, length: int = 12) -> str:
    """A short, stable hash of a JSON-able description of what some result depends on (configs, ids, other
    keys): equal descriptions give equal keys in any process."""
    blob = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def code_version() -> str:
    """git describe of the checkout, or the package version outside git."""
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return __version__
