"""Where things live for one config: resolved once, used by assets, the CLI and tests (no Dagster here)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tide_core.config import TideConfig, load_config, resolve_config_path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Project:
    """A loaded config plus the paths derived from it (relative paths resolve against base_dir)."""

    config: TideConfig
    config_path: Path | None
    base_dir: Path

    @classmethod
    def load(cls, config_path: str | Path | None = None) -> Project:
        path = resolve_config_path(config_path)
        cfg = load_config(path)
        base = path.resolve().parent if path is not None else Path.cwd()
        return cls(config=cfg, config_path=path.resolve() if path else None, base_dir=base)

    def resolve(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else self.base_dir / q

    @cached_property
    def root(self) -> Path:
        return self.resolve(self.config.warehouse.root)

    @property
    def store_url(self) -> str:
        url = self.config.warehouse.store_url
        if url is None:
            return str(self.root / "activations.zarr")
        return url if "://" in url else str(self.resolve(url))

    @property
    def duckdb_path(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def judge_dir(self) -> Path:
        return self.root / "judge"

    @property
    def dit_checkpoint(self) -> Path:
        return self.resolve(self.config.model.digits.checkpoint_dir)

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def num_shards(self) -> int:
        s = self.config.sampling
        return -(-s.num_samples // s.shard_size)

    def shard_keys(self) -> list[str]:
        return [f"{i:05d}" for i in range(self.num_shards)]


def content_key(description: object, length: int = 12) -> str:
    """A short, stable hash of a JSON-able description of what some result depends on (configs, ids, other
    keys): equal descriptions give equal keys in any process, so a result on record can be reused."""
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
    from tide_core import __version__

    return __version__
