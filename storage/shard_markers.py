"""A store's shard done markers: one Zarr group per complete shard, ``shards/<kkkkk>/``, whose attributes
are the shard's stats, written last.

Zarr sees every object under a store as part of its hierarchy: the plain ``shards/<kkkkk>.done`` files of
older stores made zarr-python warn ("Object at shards is not recognized as a component
of a Zarr hierarchy") whenever the store's members were listed. As groups they are ordinary members. A
marker is one ``zarr.json`` written to a temporary name and renamed, so it is there whole or not at all; each
shard writes only its own, so parallel shard writers still share nothing. Old stores stay readable (both
places are read) and ``migrate`` rewrites their markers when the store is next opened for writing.
"""

from __future__ import annotations

import json

from storage.errors import StoreError

GROUP = "shards"


def _group_json(attributes: dict) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}).encode()


class ShardMarkers:
    """The done markers of the store at ``root`` on filesystem ``fs``."""

    def __init__(self, fs, root: str):
        self.fs = fs
        self.root = root

    def path(self, shard: int) -> str:
        """The marker's file: what a reader checks and an error names."""
        return f"{self.root}/{GROUP}/{shard:05d}/zarr.json"

    def legacy_path(self, shard: int) -> str:
        return f"{self.root}/{GROUP}/{shard:05d}.done"

    def create_group(self) -> None:
        """The ``shards`` group itself (once, when the store is created or migrated)."""
        self.fs.makedirs(f"{self.root}/{GROUP}", exist_ok=True)
        if not self.fs.exists(f"{self.root}/{GROUP}/zarr.json"):
            self.fs.pipe(f"{self.root}/{GROUP}/zarr.json", _group_json({"about": "one group per complete shard"}))

    def is_done(self, shard: int) -> bool:
        return self.fs.exists(self.path(shard)) or self.fs.exists(self.legacy_path(shard))

    def mark(self, shard: int, stats: dict) -> None:
        """Write the marker last: a temporary file renamed into place."""
        self.fs.makedirs(f"{self.root}/{GROUP}/{shard:05d}", exist_ok=True)
        tmp = self.path(shard) + ".tmp"
        self.fs.pipe(tmp, _group_json(stats))
        self.fs.mv(tmp, self.path(shard))

    def clear(self, shard: int) -> None:
        """Invalidate a shard before it is written again (both places; the whole folder, since a folder
        without its zarr.json is a stray object to zarr)."""
        for p in (f"{self.root}/{GROUP}/{shard:05d}", self.legacy_path(shard)):
            if self.fs.exists(p):
                self.fs.rm(p, recursive=True)

    def found(self, shard: int) -> str:
        """What to delete to drop a shard's marker: its folder, or an old store's ``.done`` file."""
        legacy = self.legacy_path(shard)
        return legacy if self.fs.exists(legacy) else f"{self.root}/{GROUP}/{shard:05d}"

    def read(self, shard: int) -> dict:
        """The stats the marker records; StoreError naming the file when it is torn."""
        path = self.legacy_path(shard) if self.fs.exists(self.legacy_path(shard)) else self.path(shard)
        try:
            data = json.loads(self.fs.cat(path))
            return data if path.endswith(".done") else data["attributes"]
        except (json.JSONDecodeError, KeyError, TypeError, FileNotFoundError):
            raise StoreError(f"the done marker {path} of shard {shard} is torn (not the JSON it should be): "
                             f"delete {self.found(shard)} and run `tide run --force activations`; shards with "
                             "their marker are kept, this one is sampled again") from None

    def migrate(self, num_shards: int) -> int:
        """Rewrite an older store's ``.done`` files as marker groups; returns how many. Run where one
        process has the store (its creation or reopening upstream of the shard writers)."""
        if self.fs.exists(f"{self.root}/{GROUP}/zarr.json"):
            return 0
        moved = 0
        for shard in range(num_shards):
            old = self.legacy_path(shard)
            if self.fs.exists(old):
                try:
                    self.mark(shard, json.loads(self.fs.cat(old)))
                    moved += 1
                except json.JSONDecodeError:
                    pass  # a torn marker marks nothing: the shard is sampled again, as without one
                self.fs.rm(old)
        self.create_group()  # last: a migration killed halfway runs again, and reads see both places meanwhile
        return moved
