"""Which implementation of the kernels runs: compiled with numba, or the pure torch/numpy one.

``TIDE_KERNELS`` chooses for the whole process, read at the first kernel call:

* ``auto`` (or unset): compiled; if compiling fails (no numba, an LLVM that rejects the vector IR, ...),
  one warning names the cause and the process goes on with the pure kernels, which give the same results.
* ``numba``: compiled; a failed compile is an error (for tests and benchmarks that must not fall back).
* ``torch``: the pure kernels everywhere; numba is never imported.

Kernels compile by group (``top-k``, its parallel version, the pair grouping, the feature pass) the first
time a group is used: a warm-up runs each kernel of the group on tiny inputs of the types its callers
pass, so a compile error surfaces here, inside the guard, rather than halfway through a training step.
Importing ``tide_core.kernels`` compiles nothing and changes no numba setting.

Numba's on-disk cache keys each kernel on its own file only, so an edit to ``simd.py`` (whose vector
loops are inlined into the kernels) would leave stale machine code in use. Before the first compile, a
stamp (a hash of every source file of this package, numba's and llvmlite's versions) is compared with
the one stored beside the cache files; when it differs, the package's cache files are deleted first.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from tide_core.kernels import reference

ENV = "TIDE_KERNELS"
MODES = ("auto", "numba", "torch")
STAMP_FILE = "tide_kernels.stamp"
# group -> the module holding its compiled kernels and its WARM_UP entry
_COMPILED = {"topk": "numba_topk", "topk_parallel": "numba_topk", "pairs": "numba_topk",
             "features": "numba_features"}


@dataclass
class _State:
    mode: str
    ready: set[str] = field(default_factory=set)  # compiled groups warmed up
    failed: str | None = None  # why compiling failed: the pure kernels serve every group from then on


_LOCK = threading.RLock()
_state: _State | None = None
_cache_checked = False


def requested_mode() -> str:
    """TIDE_KERNELS as given (``auto`` when unset), checked."""
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not one of {', '.join(MODES)}: use {ENV}=torch for "
                         f"the pure torch/numpy kernels, {ENV}=numba to require the compiled ones, or unset it")
    return mode


def _current() -> _State:
    global _state
    if _state is None:
        with _LOCK:
            if _state is None:
                _state = _State(requested_mode())
    return _state


def active() -> str:
    """``numba`` or ``torch``: which implementation serves the kernels (``numba`` unless TIDE_KERNELS=torch
    or a compile failed)."""
    state = _current()
    return "torch" if state.mode == "torch" or state.failed else "numba"


def ops(group: str) -> ModuleType:
    """The module implementing ``group``'s kernels: compiled (warmed up on first use) or ``reference``."""
    state = _current()
    if state.mode == "torch" or state.failed:
        return reference
    if group in state.ready:
        return _compiled(group)
    with _LOCK:
        if group not in state.ready and not state.failed:
            _warm_up(state, group)
    return reference if state.failed else _compiled(group)


def _compiled(group: str) -> ModuleType:
    return importlib.import_module(f"tide_core.kernels.{_COMPILED[group]}")


def _warm_up(state: _State, group: str) -> None:
    try:
        module = _compiled(group)  # the first import also imports numba and llvmlite
        _check_cache(module)
        module.WARM_UP[group]()
    except Exception as exc:
        cause = f"{type(exc).__name__}: {exc}".strip()
        if state.mode == "numba":
            raise RuntimeError(f"{ENV}=numba, but compiling the {group!r} kernels failed ({cause}); unset "
                               f"{ENV} to fall back to the pure torch/numpy kernels") from exc
        state.failed = " ".join(cause.split())[:400]
        warnings.warn(f"tide_core.kernels: compiling the {group!r} numba kernels failed ({state.failed}); "
                      "using the pure torch/numpy kernels instead (same results, slower). Set "
                      f"{ENV}=torch to choose them and silence this warning.", RuntimeWarning, stacklevel=4)
        return
    state.ready.add(group)


def source_stamp() -> str:
    """A hash of every source file of this package and of the numba and llvmlite versions."""
    import llvmlite
    import numba

    h = hashlib.sha256(f"numba {numba.__version__} llvmlite {llvmlite.__version__}\n".encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _cache_dir(module: ModuleType) -> Path | None:
    """Where numba caches this package's kernels (``__pycache__`` here, NUMBA_CACHE_DIR, or a user-wide
    directory when this one is read-only), from a cached kernel's own cache object."""
    for obj in vars(module).values():
        cache = getattr(obj, "_cache", None)
        path = getattr(cache, "cache_path", None)
        if path:
            return Path(path)
    return None


def _check_cache(module: ModuleType) -> None:
    """Once per process, before the first compile: wipe this package's numba cache files if the stamp
    beside them is not this source's (see the module docstring)."""
    global _cache_checked
    if _cache_checked:
        return
    _cache_checked = True
    cache = _cache_dir(module)
    if cache is None:
        return
    stamp = source_stamp()
    stamp_file = cache / STAMP_FILE
    try:
        if stamp_file.exists() and stamp_file.read_text().strip() == stamp:
            return
        stems = {f"{name}." for name in set(_COMPILED.values())}
        for f in cache.glob("*.nb[ic]"):
            if any(f.name.startswith(s) for s in stems):
                f.unlink(missing_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{STAMP_FILE}.{os.getpid()}"
        tmp.write_text(stamp + "\n")
        tmp.replace(stamp_file)
    except OSError:  # a read-only cache: numba then caches elsewhere or not at all; nothing stale to fear
        pass


@contextmanager
def forced(mode: str) -> Iterator[None]:
    """Run a block as if TIDE_KERNELS were ``mode`` (for tests and benchmarks comparing the two paths).
    The block starts from a fresh state: each group is warmed up again on first use (milliseconds once
    numba holds the compiled code)."""
    global _state
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    with _LOCK:
        before = _current()
        _state = _State(mode)
    try:
        yield
    finally:
        with _LOCK:
            if before.mode != "torch" and not _state.failed:
                before.ready |= _state.ready
            _state = before
