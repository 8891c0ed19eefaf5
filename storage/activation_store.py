"""The Zarr v3 activation store: one per capture run, indexed by step and layer.

Layout (see docs/STORE.md):
    <store>/zarr.json                          group attrs: schema_version, layout, provenance
    <store>/samples/{class_id,seed}  [N]       int32 / int64, chunks (shard_size,)
    <store>/samples/images           [N,H,W,C] uint8, chunks (shard_size, H, W, C)
    <store>/acts/<site>/layer_<LL>   [S,N,P,D] float16, chunks (1, shard_size, P, D)
    <store>/acts/token_index         [S,N,P]   int16, only when tokens are subsampled; shared by
                                                every image site and layer (one token draw per sample and step)
    <store>/acts/<text site>/layer_<LL> [S,N,L,D] a text site (layout.text_tokens): every position of the
                                                text sequence, chunks (1, shard_size, L, D)
    <store>/acts/<text site>/token_mask [N,L]  bool: the positions holding a prompt token (padding False)
    <store>/acts/<site>/{step,timestep,sample_id,row,col}   coordinates for xarray (storage.store_coords)
    <store>/shards/<kkkkk>/zarr.json           completion marker (a group; attrs = the shard's stats), written
                                                last (storage.shard_markers)
S counts captured steps (attrs["steps"] maps axis 0 to schedule steps), N samples, P stored tokens,
D channels. Shard writes never share a chunk, so parallel writers need no locks; a shard without its
marker is incomplete: it is redone, never read. A store whose layout has ``acts_from_shard > 0`` holds
activations (and token indices) only from that shard on: the shards before it have their images, classes,
seeds and markers, and every activation read of them raises (their chunks are absent, NaN to plain zarr).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem

from storage.errors import StoreError, StoreMismatchError
from storage.shard_markers import ShardMarkers
from storage.store_checks import damaged_chunks, repair_hint
from storage.store_coords import write_coordinates
from storage.store_layout import ShardStats, StoreLayout
from storage.token_batches import BlockOrder, StoreTokenBatch, shuffled_token_batches

SCHEMA_VERSION = 1
# Provenance keys that may differ between runs writing the same store (not part of its identity).
VOLATILE_KEYS = frozenset({"created_at", "code_version"})


def act_path(site: str, layer: int) -> str:
    return f"acts/{site}/layer_{layer:02d}"


def mask_path(site: str) -> str:
    return f"acts/{site}/token_mask"


class ActivationStore:
    """Read and write one run's activations. Construct with create() or open()."""

    def __init__(self, url: str, group: zarr.Group):
        self.url = url.rstrip("/")
        self.group = group
        self.layout = StoreLayout(**group.attrs["layout"])
        self.fs, self._root = fsspec.core.url_to_fs(self.url)
        self._local = isinstance(self.fs, LocalFileSystem)
        self._arrays: dict[str, zarr.Array] = {}  # zarr re-reads zarr.json on every group lookup
        self._made_dirs: set[str] = set()
        self.markers = ShardMarkers(self.fs, self._root)

    # ---- creation and identity -------------------------------------------------------------

    @classmethod
    def create(cls, url: str, layout: StoreLayout, provenance: dict, overwrite: bool = False) -> ActivationStore:
        """Create the store's arrays once (upstream of parallel shard writers), or reopen it.

        Reopening checks that layout and provenance match and raises StoreMismatchError naming every
        difference; overwrite=True deletes the old store instead.
        """
        url = url.rstrip("/")
        fs, root = fsspec.core.url_to_fs(url)
        if fs.exists(f"{root}/zarr.json"):
            if overwrite:
                fs.rm(root, recursive=True)
            else:
                store = cls.open(url)
                store.check_matches(layout, provenance)
                store._upgrade()
                return store
        _check_writable(fs, root)
        group = zarr.open_group(url, mode="w")
        lay = layout
        codecs = [] if lay.compression == "none" else [
            zarr.codecs.BloscCodec(cname=lay.compression, clevel=1, shuffle="shuffle")]
        # Every chunk is written once and is never all-fill: skip zarr's "is it empty?" scan on write.
        fast = {"write_empty_chunks": True}
        # "c.<step>.<shard>.0.0" in one directory per array: "/" would nest a directory per step and shard,
        # and creating them cost as much as writing the data.
        flat = {"name": "default", "separator": "."}
        n, sh = lay.num_samples, lay.shard_size
        group.create_array("samples/class_id", shape=(n,), chunks=(sh,), dtype="int32", fill_value=-1)
        group.create_array("samples/seed", shape=(n,), chunks=(sh,), dtype="int64", fill_value=-1)
        group.create_array("samples/images", shape=(n, *lay.image_shape), chunks=(sh, *lay.image_shape),
                           dtype="uint8", fill_value=0)
        dims = ["step", "sample", "token", "channel"]
        # Chunks that are never written read as NaN, not as plausible zeros, in tools that bypass this class
        # (xarray, plain zarr); this class refuses to read them at all.
        fill = float("nan") if lay.acts_from_shard else 0
        for site in lay.sites:
            p = lay.tokens_of(site)
            for layer in lay.layers:
                arr = group.create_array(act_path(site, layer), shape=(len(lay.steps), n, p, lay.d_model),
                                         dtype=lay.dtype, chunks=(1, sh, p, lay.d_model), config=fast,
                                         chunk_key_encoding=flat,
                                         compressors=codecs, fill_value=fill, dimension_names=dims)
                arr.attrs.update({"site": site, "layer": layer})
            if lay.is_text(site):  # per sample: a prompt's padding is the same at every step and layer
                group.create_array(mask_path(site), shape=(n, p), chunks=(sh, p), dtype="bool", fill_value=False,
                                   dimension_names=dims[1:3])
        if lay.subsampled:
            group.create_array("acts/token_index", shape=(len(lay.steps), n, lay.tokens_stored),
                               chunks=(1, sh, lay.tokens_stored),
                               dtype="int16", fill_value=-1, dimension_names=dims[:3], config=fast)
        group.attrs.update({
            "schema_version": SCHEMA_VERSION,
            "layout": lay.attrs(),
            "provenance": {**provenance, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        })
        store = cls(url, group)
        store._upgrade()
        return store

    def _upgrade(self) -> None:
        """Bring a store to this code's layout without touching its data: the shards group and coordinate
        arrays of stores written before they existed. Runs where one process has the store (its creation, or
        its reopening upstream of the shard writers)."""
        self.markers.migrate(self.layout.num_shards)
        acts = [act_path(site, layer) for site in self.layout.sites for layer in self.layout.layers]
        write_coordinates(self.group, self.layout, self.provenance.get("capture_timesteps"), acts)

    @classmethod
    def open(cls, url: str, mode: str = "r+") -> ActivationStore:
        url = url.rstrip("/")
        fs, root = fsspec.core.url_to_fs(url)
        if not fs.exists(f"{root}/zarr.json"):
            raise StoreError(f"no activation store at {url}: materialize `activations` first")
        group = zarr.open_group(url, mode=mode)
        version = group.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"store {url} has schema_version={version}, this code reads {SCHEMA_VERSION}; "
                             "re-capture it (or use the matching code version)")
        return cls(url, group)

    @property
    def provenance(self) -> dict:
        return dict(self.group.attrs["provenance"])

    def check_matches(self, layout: StoreLayout, provenance: dict) -> None:
        diffs = _diff("layout", asdict(self.layout), asdict(layout))
        old = {k: v for k, v in self.provenance.items() if k not in VOLATILE_KEYS}
        new = {k: v for k, v in json.loads(json.dumps(provenance)).items() if k not in VOLATILE_KEYS}
        diffs += _diff("provenance", old, new)
        if diffs:
            shown = "\n  ".join(diffs[:20])
            raise StoreMismatchError(
                f"the store at {self.url} was written with a different config:\n  {shown}\n"
                "use another warehouse root, restore the old config, or overwrite (tide run --overwrite)"
            )

    # ---- shard lifecycle --------------------------------------------------------------------

    def _marker(self, shard: int) -> str:
        return self.markers.path(shard)

    def is_done(self, shard: int) -> bool:
        return self.markers.is_done(shard)

    def done_shards(self) -> list[int]:
        return [s for s in range(self.layout.num_shards) if self.is_done(s)]

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.layout.num_shards) if not self.is_done(s)]

    def act_shards(self) -> list[int]:
        """Done shards whose activations the store holds."""
        return [s for s in self.done_shards() if s >= self.layout.acts_from_shard]

    def begin_shard(self, shard: int) -> range:
        """Invalidate a shard before (re)writing it: readers skip it until mark_done."""
        rng = self.layout.shard_range(shard)
        self.markers.clear(shard)
        return rng

    def mark_done(self, shard: int, stats: ShardStats) -> None:
        self.markers.mark(shard, asdict(stats))

    def shard_stats(self, shard: int) -> dict:
        return self.markers.read(shard)

    # ---- writing ----------------------------------------------------------------------------

    def write_samples(self, shard: int, images: np.ndarray, class_ids: np.ndarray, seeds: np.ndarray) -> None:
        rng = self.layout.shard_range(shard)
        sl = slice(rng.start, rng.stop)
        if images.shape != (len(rng), *self.layout.image_shape) or images.dtype != np.uint8:
            raise StoreError(f"images for shard {shard} must be uint8 {(len(rng), *self.layout.image_shape)}, "
                             f"got {images.dtype} {images.shape}")
        self.group["samples/images"][sl] = images
        self.group["samples/class_id"][sl] = class_ids.astype(np.int32)
        self.group["samples/seed"][sl] = seeds.astype(np.int64)

    def write_token_mask(self, shard: int, site: str, mask: np.ndarray) -> None:
        """A text site's mask of one shard: bool [n, L], True where a position holds a prompt token."""
        rng = self.layout.shard_range(shard)
        want = (len(rng), self.layout.tokens_of(site))
        if not self.layout.is_text(site) or mask.shape != want:
            raise StoreError(f"token_mask of {site!r} for shard {shard}: the store has text sites "
                             f"{list(self.layout.text_tokens)} and expects bool {want}, got {mask.shape}")
        self.group[mask_path(site)][rng.start:rng.stop] = mask.astype(bool)

    def write_step(self, shard: int, step: int, acts: dict[tuple[str, int], np.ndarray],
                   token_index: np.ndarray | None) -> int:
        """Write one step of one shard: acts[(site, layer)] is [n, P, D]. Returns bytes written (raw)."""
        lay = self.layout
        rng = lay.shard_range(shard)
        s = lay.step_axis(step)
        sl = slice(rng.start, rng.stop)
        expected = (len(rng), lay.tokens_stored, lay.d_model)  # an image site's; a text site has L positions
        if shard < lay.acts_from_shard:
            raise StoreError(f"shard {shard} keeps no activations in this store (they are stored from shard "
                             f"{lay.acts_from_shard} on): write only its samples")
        nbytes = 0
        for (site, layer), a in acts.items():
            if a.shape != (len(rng), lay.tokens_of(site), lay.d_model):
                raise StoreError(f"acts[{site}, layer {layer}] step {step} has shape {a.shape}, "
                                 f"the store expects {(len(rng), lay.tokens_of(site), lay.d_model)}")
            self._write_block(self._array(act_path(site, layer)), (s, shard, 0, 0), sl,
                              a.astype(lay.dtype, copy=False))
            nbytes += a.size * np.dtype(lay.dtype).itemsize
        if lay.subsampled:
            if token_index is None or token_index.shape != expected[:2]:
                raise StoreError(f"token_index for step {step} must have shape {expected[:2]}")
            self._array("acts/token_index")[s, sl] = token_index.astype(np.int16)
        return nbytes

    def _plain_chunk_key(self, arr: zarr.Array, chunk: tuple[int, ...], shape: tuple[int, ...]) -> str | None:
        """The filesystem path of a whole uncompressed chunk of ``shape``, or None if zarr must handle it:
        such chunks are just their bytes (little-endian, C order: what zarr's bytes codec produces)."""
        codecs = arr.metadata.codecs
        plain = len(codecs) == 1 and isinstance(codecs[0], zarr.codecs.BytesCodec)
        if plain and tuple(shape) == tuple(arr.metadata.chunk_grid.chunk_shape[1:]):
            return f"{self._root}/{arr.path}/{arr.metadata.encode_chunk_key(chunk)}"
        return None

    def _write_block(self, arr: zarr.Array, chunk: tuple[int, ...], samples: slice, block: np.ndarray) -> None:
        """Write one whole chunk (step s, one shard). Uncompressed chunks of a full shard are written as
        their bytes straight to the store's filesystem: zarr-python's per-chunk machinery costs ~3 ms per
        MB, several times the I/O. Anything else (a codec, a short last shard) goes through zarr."""
        key = self._plain_chunk_key(arr, chunk, block.shape)
        if key is not None:
            data = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<")).tobytes()
            parent = key.rsplit("/", 1)[0]
            if parent not in self._made_dirs:
                self.fs.makedirs(parent, exist_ok=True)
                self._made_dirs.add(parent)
            self.fs.pipe_file(key, data)
        else:
            arr[chunk[0], samples] = block

    # ---- reading ----------------------------------------------------------------------------

    def _require_done(self, sample_range: range) -> None:
        """Every shard an activation read touches is complete and holds its activations."""
        lay = self.layout
        sh = lay.shard_size
        if sample_range.start < lay.act_samples.start:
            raise StoreError(
                f"samples {sample_range.start}..{sample_range.stop - 1} are not all in {self.url}: it stores the "
                f"activations of samples {lay.act_samples.start}..{lay.num_samples - 1} only (shards "
                f"{lay.acts_from_shard} on, the held-out ones), because it was captured for streaming SAE "
                "training (sae.stream = true). Read those samples, or set sae.stream = false and re-capture "
                "(tide run --overwrite) to store every shard's activations")
        for shard in range(sample_range.start // sh, -(-sample_range.stop // sh)):
            if not self.is_done(shard):
                raise StoreError(f"shard {shard} of {self.url} is not complete (no done marker): "
                                 "materialize its `activations` partition")

    def _require_chunks(self, arr: zarr.Array, step_axes, sample_range: range) -> None:
        """Every chunk a read needs is there and whole: zarr would read a missing one as zeros."""
        sh = self.layout.shard_size
        shards = range(sample_range.start // sh, -(-sample_range.stop // sh))
        bad = damaged_chunks(self.fs, self._root, arr, step_axes, shards)
        if bad:
            path, what = bad[0]
            shard = int(path.rsplit("/", 1)[-1].split(".")[2])
            more = f" ({len(bad) - 1} more chunks too)" if len(bad) > 1 else ""
            raise StoreError(f"chunk {path} {what}{more}: shard {shard} of {self.url} is marked done but its data "
                             f"is not all there. To repair it, {repair_hint(self.markers.found(shard))}")

    def _array(self, key: str) -> zarr.Array:
        if key not in self._arrays:
            self._arrays[key] = self.group[key]
        return self._arrays[key]

    def array(self, site: str, layer: int) -> zarr.Array:
        if site not in self.layout.sites or layer not in self.layout.layers:
            raise StoreError(f"({site}, layer {layer}) was not captured; captured sites {self.layout.sites}, "
                             f"layers {self.layout.layers}")
        return self._array(act_path(site, layer))

    def read_step(self, site: str, layer: int, step: int, samples: range | None = None) -> np.ndarray:
        """Activations of one (layer, step): [n, P, D] over completed samples (default every sample whose
        activations the store holds)."""
        samples = samples or self.layout.act_samples
        self._require_done(samples)
        arr, a = self.array(site, layer), self.layout.step_axis(step)
        self._require_chunks(arr, [a], samples)
        return arr[a, samples.start:samples.stop]

    def read_block(self, site: str, layer: int, step: int, shard: int) -> np.ndarray:
        """One whole chunk, the feature pass's unit: [shard samples, P, D] of one shard at one step.
        Uncompressed chunks are read as bytes straight from the filesystem (the mirror of the writer's
        fast path; through zarr the read costs ~3 ms per MB); anything else goes through zarr."""
        lay = self.layout
        samples = lay.shard_range(shard)
        self._require_done(samples)
        arr, a = self.array(site, layer), lay.step_axis(step)
        shape = (len(samples), lay.tokens_of(site), lay.d_model)
        key = self._plain_chunk_key(arr, (a, shard, 0, 0), shape)
        if key is None:
            self._require_chunks(arr, [a], samples)
            return arr[a, samples.start:samples.stop]
        dtype = np.dtype(lay.dtype).newbyteorder("<")
        try:
            if self._local:  # one read straight into the array: ~0.2 ms a MB, against ~0.8 through fsspec
                block = np.fromfile(key, dtype=dtype)
            else:
                block = np.frombuffer(bytearray(self.fs.cat_file(key)), dtype=dtype)  # writable: torch wraps it
        except FileNotFoundError:
            block = np.empty(0, dtype)
        if block.size != np.prod(shape):
            what = "is missing" if block.size == 0 else f"holds {block.size} values, not {shape}"
            raise StoreError(f"chunk {key} {what}: shard {shard} of {self.url} is marked done but its data is "
                             f"damaged. To repair it, {repair_hint(self.markers.found(shard))}")
        return block.reshape(shape)

    def __reduce__(self):
        # Pickled (e.g. into a dask.distributed task) as its URL: the worker reopens the store read-only.
        return (ActivationStore.open, (self.url, "r"))

    def read_samples(self, site: str, layer: int, start: int, stop: int) -> np.ndarray:
        """Activations of a sample range over all captured steps: [S, n, P, D]."""
        self._require_done(range(start, stop))
        arr = self.array(site, layer)
        self._require_chunks(arr, range(len(self.layout.steps)), range(start, stop))
        return arr[:, start:stop]

    def read_tokens(self, site: str, layer: int, step: int, sample_ids: Sequence[int]) -> np.ndarray:
        """Activations of some samples at one step: [len(sample_ids), P, D], sample_ids sorted ascending."""
        ids = np.asarray(sample_ids, np.int64)
        span = range(int(ids.min()), int(ids.max()) + 1)
        self._require_done(span)
        arr, a = self.array(site, layer), self.layout.step_axis(step)
        self._require_chunks(arr, [a], span)
        return arr.get_orthogonal_selection((a, ids))

    def token_mask(self, site: str, start: int, stop: int) -> np.ndarray | None:
        """A text site's valid positions, bool [n, L] (padding False); None for an image site (every stored
        token is one)."""
        if not self.layout.is_text(site):
            return None
        self._require_done(range(start, stop))
        return self._array(mask_path(site))[start:stop]

    def token_index(self, start: int, stop: int) -> np.ndarray:
        """Stored image-token positions [S, n, P] (identity grid when not subsampled)."""
        lay = self.layout
        if lay.subsampled:
            self._require_done(range(start, stop))
            return self.group["acts/token_index"][:, start:stop]
        return np.broadcast_to(np.arange(lay.tokens_total, dtype=np.int16),
                               (len(lay.steps), stop - start, lay.tokens_total))

    def samples(self) -> dict[str, np.ndarray]:
        return {"class_id": self.group["samples/class_id"][:], "seed": self.group["samples/seed"][:]}

    def images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.group["samples/images"][start:stop]

    def dask(self, site: str, layer: int):
        """A lazy dask array [S, N, P, D] that respects the Zarr chunks. It reads without this class's checks:
        slice it to done shards, and to ``layout.act_samples`` (the rest reads as NaN)."""
        import dask.array as da

        self.array(site, layer)  # validates the key
        return da.from_zarr(self.url, component=act_path(site, layer))

    def shard_stored_bytes(self, shard: int) -> int:
        """Bytes on disk of one shard's activation chunks (chunk key c.<step>.<shard>.0.0)."""
        pattern = f"{self._root}/acts/*/layer_*/c.*.{shard}.0.0"
        return int(sum(self.fs.size(p) for p in self.fs.glob(pattern)))

    def stored_bytes(self) -> int:
        return int(sum(self.fs.du(self._root, total=False).values()))

    def iter_token_batches(self, site: str, layer: int, batch_size: int, seed: int,
                           sample_ids: Sequence[int] | None = None, steps: Sequence[int] | None = None,
                           epochs: int = 1, samples_per_block: int | None = None,
                           drop_last: bool = True, order: BlockOrder = "samples",
                           start: int = 0) -> Iterator[StoreTokenBatch]:
        """Shuffled token batches for SAE training, balanced across steps, memory bounded.

        Reads one block of samples (default a shard's worth, drawn at random; ``order="shards"``: one whole
        shard, the shards in random order) over all steps at a time, shuffles its tokens, and yields batches.
        Each block holds every step equally, so every batch mixes steps in the proportion they were captured.
        Memory: one block, S * block * P * D values. drop_last=False also yields the final short batch
        (evaluation wants every token); ``start`` begins the same stream at that token, without reading the
        blocks before it. Default samples: every sample whose activations the store holds. A text site's
        stream holds its valid positions only (``token_mask``): padding is never yielded.
        """
        lay = self.layout
        arr = self.array(site, layer)
        sample_ids = np.asarray(lay.act_samples) if sample_ids is None else np.asarray(sample_ids)
        if order == "shards" and samples_per_block not in (None, lay.shard_size):
            raise StoreError(f"order='shards' reads one shard ({lay.shard_size} samples) a block, not "
                             f"samples_per_block={samples_per_block}")
        if len(sample_ids) == 0:
            raise StoreError("iter_token_batches got no sample ids")
        span = range(int(sample_ids.min()), int(sample_ids.max()) + 1)
        self._require_done(span)
        axes = np.arange(len(lay.steps)) if steps is None else np.array([lay.step_axis(s) for s in steps])
        self._require_chunks(arr, axes, span)
        yield from shuffled_token_batches(
            arr, axes, sample_ids, steps=np.asarray(lay.steps, np.int64),
            timesteps=np.asarray(self.provenance["capture_timesteps"], np.int64), batch_size=batch_size,
            seed=seed, epochs=epochs, block=samples_per_block or lay.shard_size, drop_last=drop_last,
            order=order, start=start, valid=self.valid_positions(site))

    def stream_tokens(self, site: str, sample_ids: Sequence[int]) -> int:
        """Tokens one pass over these samples' stream yields: every stored token, a text site's valid ones."""
        valid = self.valid_positions(site)
        per_step = len(sample_ids) * self.layout.tokens_of(site) if valid is None else int(valid[sample_ids].sum())
        return len(self.layout.steps) * per_step

    def valid_positions(self, site: str) -> np.ndarray | None:
        """A text site's mask over every sample, bool [N, L] (unwritten shards all False); None for an image
        site. Small (a bit per position), so the token streams hold it whole."""
        return self._array(mask_path(site))[:] if self.layout.is_text(site) else None


def _check_writable(fs, root: str) -> None:
    try:
        fs.makedirs(root, exist_ok=True)
        probe = f"{root}/.write_probe"
        fs.pipe(probe, b"ok")
        fs.rm(probe)
    except OSError as err:
        raise StoreError(f"cannot write the activation store at {root}: {err}; "
                         "set warehouse.root to a writable location") from None


def _diff(prefix: str, old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(f"{prefix}.{key}", a, b)
        elif a != b:
            out.append(f"{prefix}.{key}: store has {_short(a)}, config asks for {_short(b)}")
    return out


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 80 else s[:77] + "..."
