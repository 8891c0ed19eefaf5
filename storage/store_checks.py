"""Whether a done shard's data is all there: a marker promises the chunks, a full disk or a copy cut short can
break the promise, and zarr reads a missing chunk as its fill value (zeros), a silent wrong answer.

Readers call ``damaged_chunks`` before reading through zarr: one listing of the array's folder, then each
chunk the read needs must exist, and an uncompressed one must hold the whole chunk. The error names the file
and the repair (``repair_hint``): drop the shard's marker and let ``tide run`` sample it again.
"""

from __future__ import annotations

import numpy as np
import zarr


def damaged_chunks(fs, root: str, arr: zarr.Array, step_axes, shards) -> list[tuple[str, str]]:
    """(chunk file, what is wrong) for each chunk of ``arr`` at (step axis, shard) that is missing or short."""
    folder = f"{root}/{arr.path}"
    try:
        sizes = {e["name"].rsplit("/", 1)[-1]: e["size"] for e in fs.ls(folder, detail=True)}
    except FileNotFoundError:
        sizes = {}
    codecs = arr.metadata.codecs
    plain = len(codecs) == 1 and isinstance(codecs[0], zarr.codecs.BytesCodec)
    want = int(np.prod(arr.metadata.chunk_grid.chunk_shape)) * arr.dtype.itemsize if plain else 1
    out = []
    for a in step_axes:
        for shard in shards:
            key = arr.metadata.encode_chunk_key((int(a), int(shard)) + (0,) * (arr.ndim - 2))
            size = sizes.get(key)
            if size is None:
                out.append((f"{folder}/{key}", "is missing"))
            elif size < want:
                out.append((f"{folder}/{key}", f"holds {size} bytes, not {want}"))
    return out


def repair_hint(marker: str) -> str:
    return (f"delete the shard's done marker ({marker}) and run `tide run --force activations`: shards with "
            "their marker are kept, this one is sampled again (the same bits: a sample depends only on the seed "
            "and its id)")
