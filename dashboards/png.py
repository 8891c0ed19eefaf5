"""A minimal PNG encoder for uint8 images (numpy + zlib), so the site builder needs no imaging library.

Sample images are small (16x16 digits, 256x256 DiT-XL decodes) and written once per sample; stock
zlib at level 6 is fast enough and the browser decodes them natively.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def encode_png(image: np.ndarray, level: int = 6) -> bytes:
    """uint8 [H, W], [H, W, C] (C in 1..4) -> PNG bytes."""
    if image.dtype != np.uint8:
        raise ValueError(f"encode_png takes uint8 pixels, got {image.dtype}; convert (e.g. np.clip(x, 0, 255)) first")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in _COLOR_TYPE or 0 in image.shape:
        raise ValueError(f"encode_png takes an [H, W] or [H, W, C<=4] image, got shape {image.shape}")
    h, w, c = image.shape
    # Every scanline starts with filter byte 0 (None): the simplest valid stream; zlib does the rest.
    rows = np.concatenate([np.zeros((h, 1), np.uint8), np.ascontiguousarray(image).reshape(h, w * c)], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPE[c], 0, 0, 0)
    return b"".join([
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", header),
        _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)),
        _chunk(b"IEND", b""),
    ])


def downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink by an integer factor (block mean) until the longer side is <= max_side; small ones pass."""
    h, w = image.shape[:2]
    factor = -(-max(h, w) // max_side)
    if factor <= 1:
        return image
    h2, w2 = h // factor, w // factor
    blocks = image[: h2 * factor, : w2 * factor].reshape(h2, factor, w2, factor, *image.shape[2:])
    return blocks.mean(axis=(1, 3)).round().astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
