"""Writing the site: files under the build folder, file-safe names, and the JSON values in the files.

Numbers are kept short and safe for JavaScript: floats to SIG_DIGITS significant digits (the warehouse
keeps full precision), NaN, inf and NULL as null, integers exact, and integers beyond 2**53 (seeds) as
text, since a JavaScript number would silently change them. Whole Arrow columns go through
``json_column``, vectorised, which keeps a 16k-feature SAE to seconds; single values through
``json_value``. Both round with the same rule (``round_sig`` is the vectorised form of ``_round_one``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

SIG_DIGITS = 5  # significant digits kept for floats in the JSON
_JS_SAFE_INT = 2**53  # JavaScript numbers hold integers exactly up to here; larger ones go as text
_EXACT_POW10 = 22  # 10**22 is the largest power of ten a double holds exactly


class SiteWriter:
    """Writes files under the build folder and counts them (files and bytes go into the build report)."""

    def __init__(self, root: Path):
        self.root = root
        self.files = 0
        self.bytes = 0
        root.mkdir(parents=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files += 1
        self.bytes += len(data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, separators=(",", ":"), allow_nan=False).encode())


def swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished build; the old site disappears only once the new one is complete."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def slugs(ids: list[str]) -> dict[str, str]:
    """id -> a file-name-safe, unique slug (ids are data, never trusted as paths).

    Uniqueness ignores case, so two ids differing only in case cannot share a folder on a
    case-insensitive file system.
    """
    out: dict[str, str] = {}
    used: set[str] = set()
    for i in ids:
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", i).strip(".")[:80] or "x"
        slug, n = base, 1
        while slug.lower() in used:
            n += 1
            slug = f"{base}-{n}"
        used.add(slug.lower())
        out[i] = slug
    return out


# ----------------------------------------------------------------------------------- JSON values


def json_value(value: Any) -> Any:
    """Any value from a warehouse row (nested dicts and lists included) as JSON-ready Python."""
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | np.generic):
        return json_number(value)
    return value if isinstance(value, str) else str(value)


def json_number(v: Any) -> Any:
    """A JSON-safe number: floats rounded, NaN and inf as None, integers past 2**53 as text."""
    if isinstance(v, np.integer):
        v = int(v)
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v if abs(v) < _JS_SAFE_INT else str(v)
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return _round_one(v) if math.isfinite(v) else None
    return v


def json_columns(table: pa.Table, drop: set[str] | frozenset[str] = frozenset()) -> dict[str, list[Any]]:
    """{column: [JSON values]} for every column of ``table`` not in ``drop``."""
    return {name: json_column(table.column(name)) for name in table.column_names if name not in drop}


def json_column(col: pa.ChunkedArray) -> list[Any]:
    """One Arrow column as JSON-ready values, vectorised (the same values ``json_value`` gives one by one)."""
    t = col.type
    if pa.types.is_integer(t):
        ints = col.fill_null(0).to_numpy(zero_copy_only=False)  # not through floats: seeds need every digit
        out = ints.tolist()
        for i in np.flatnonzero(np.abs(ints) >= _JS_SAFE_INT).tolist():
            out[i] = str(out[i])
        for i in np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False)).tolist():
            out[i] = None
        return out
    if pa.types.is_floating(t):
        arr = col.to_numpy(zero_copy_only=False).astype(np.float64)  # NULLs become NaN
        missing = ~np.isfinite(arr)
        out = round_sig(np.where(missing, 0.0, arr)).tolist()
        for i in np.flatnonzero(missing).tolist():
            out[i] = None
        return out
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t):
        return col.to_pylist()
    return [json_value(v) for v in col.to_pylist()]


def _round_one(v: float) -> float:
    """The rounding rule: the double nearest ``v`` written with SIG_DIGITS significant digits."""
    return float(f"{v:.{SIG_DIGITS}g}")


def round_sig(x: np.ndarray) -> np.ndarray:
    """``_round_one`` of every finite value of ``x``, vectorised; the result equals it value for value.

    Scaling by an exact power of ten, rounding to an integer and scaling back gives the double nearest
    the short decimal. Where that cannot be trusted the value goes through ``_round_one`` itself: a
    scaled value within 1e-6 of a half (the multiplication's own rounding may have moved it across the
    tie), and exponents past 10**22, where powers of ten are not exact doubles. Both are rare.
    """
    out = np.array(x, dtype=np.float64)
    nz = np.flatnonzero(np.isfinite(out) & (out != 0))
    if not len(nz):
        return out
    v = out[nz]
    d = SIG_DIGITS - 1 - np.floor(np.log10(np.abs(v))).astype(np.int64)  # decimal places to keep
    scale = 10.0 ** np.minimum(np.abs(d), _EXACT_POW10)
    scaled = np.where(d >= 0, v * scale, v / scale)
    whole = np.round(scaled)
    out[nz] = np.where(d >= 0, whole / scale, whole * scale)
    unsure = (np.abs(d) > _EXACT_POW10) | (np.abs(np.abs(scaled - np.trunc(scaled)) - 0.5) < 1e-6)
    for i in nz[unsure].tolist():
        out[i] = _round_one(float(x[i]))
    return out
