"""tide_core.kernels: the top-k and pair grouping on both backends against torch and numpy references, the
two backends against each other, and the guards (fallback, cache stamp, threading layer)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from kernel_backends import BACKENDS, use_backend

from tide_core import kernels
from tide_core.kernels import backend as kernels_backend

ROOT = Path(__file__).resolve().parent.parent
TORCH_ONLY = os.environ.get(kernels_backend.ENV, "").strip().lower() == "torch"
needs_numba = pytest.mark.skipif(TORCH_ONLY, reason="TIDE_KERNELS=torch: compiled kernels switched off")

backend = pytest.fixture(params=BACKENDS)(use_backend)


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)


def _check(x: np.ndarray, k: int) -> np.ndarray:
    top = kernels.topk(torch.from_numpy(x), k)
    values, indices = top.values.numpy(), top.indices.numpy()
    want = np.sort(np.partition(x, x.shape[1] - k, axis=1)[:, x.shape[1] - k:], axis=1)
    np.testing.assert_array_equal(np.sort(values, axis=1), want)
    np.testing.assert_array_equal(np.take_along_axis(x, indices, 1), values)
    assert (np.diff(np.sort(indices, axis=1), axis=1) > 0).all()  # distinct positions
    return indices


@pytest.mark.parametrize("n,k", [(1024, 32), (100, 16), (64, 63), (257, 1), (40, 40)])
def test_topk_is_exact(backend, n, k):
    rng = np.random.default_rng(0)
    torch.set_num_threads(1)
    _check(rng.normal(size=(300, n)).astype(np.float32), k)
    _check(-np.abs(rng.normal(size=(300, n))).astype(np.float32), k)  # all negative
    torch.set_num_threads(2)
    _check(rng.normal(size=(600, n)).astype(np.float32), k)  # rows split over two threads


def test_topk_ties_go_to_the_lowest_position(backend):
    x = np.zeros((8, 128), np.float32)
    x[:, 100:] = 1.0  # 28 ones, 100 zeros: top-32 = the ones and the first four zeros
    idx = np.sort(_check(x, 32), axis=1)
    np.testing.assert_array_equal(idx, np.tile(np.r_[0:4, 100:128], (8, 1)))


def test_topk_masked_rows_and_nan(backend):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 256)).astype(np.float32)
    masked = np.where(rng.random(x.shape) < 0.95, -np.inf, x).astype(np.float32)  # AuxK's dead-only rows
    masked[:, :8] = x[:, :8]  # at least k finite entries per row
    _check(masked, 8)
    x[3, 17] = np.nan
    # a row with a NaN: torch.topk for the batch, which ranks NaN as the largest value
    sel = kernels.topk(torch.from_numpy(x), 8)
    assert bool(torch.isnan(sel.values[3]).any())
    rest = torch.from_numpy(np.delete(x, 3, axis=0))
    got = torch.from_numpy(np.sort(np.delete(sel.values.numpy(), 3, axis=0), axis=1))
    assert torch.equal(got, rest.topk(8, dim=1).values.sort(1).values)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        kernels.topk(torch.from_numpy(x), 300)


@pytest.mark.parametrize("n,k", [(1024, 32), (96, 7), (64, 40)])
def test_topk_many_ties_match_a_stable_sort(backend, n, k):
    # integers: most values repeat, so the k-th value is tied in nearly every row; the selection must be
    # exactly what a stable descending sort takes (equal values, lower position first)
    x = np.round(np.random.default_rng(3).normal(size=(400, n)) * 2).astype(np.float32)
    want = np.sort(np.argsort(-x, axis=1, kind="stable")[:, :k], axis=1)
    np.testing.assert_array_equal(np.sort(_check(x, k), axis=1), want)


def test_topk_exact_when_the_running_guess_is_wrong(backend):
    # the compiled kernel screens rows with a guess from earlier rows' k-th values; rows on wildly
    # different scales make the guess too high (fewer than k kept: the exact group bound takes over) or
    # far too low
    rng = np.random.default_rng(4)
    scale = 10.0 ** rng.uniform(-3, 3, size=(500, 1))
    shift = rng.normal(size=(500, 1)) * scale * 3
    _check((rng.normal(size=(500, 1024)) * scale + shift).astype(np.float32), 32)
    _check((rng.normal(size=(500, 96)) * scale + shift).astype(np.float32), 40)  # k > 32: no group bound


def test_pairs_by_latent_is_a_stable_sort(backend):
    rng = np.random.default_rng(2)
    idx = np.stack([rng.choice(300, 12, replace=False) for _ in range(200)])  # [B, k] distinct per row
    p = kernels.pairs_by_latent(torch.from_numpy(idx), 300)
    np.testing.assert_array_equal(p.order.numpy(), np.argsort(idx.reshape(-1), kind="stable"))
    np.testing.assert_array_equal(p.tokens.numpy(), p.order.numpy() // 12)
    counts = np.bincount(idx.reshape(-1), minlength=300)
    np.testing.assert_array_equal(p.crow.numpy(), np.r_[0, np.cumsum(counts)])


@needs_numba
def test_the_backends_select_the_same_entries_in_the_same_order():
    rng = np.random.default_rng(5)
    cases = [(rng.normal(size=(700, 1024)), 32), (np.round(rng.normal(size=(300, 200)) * 2), 16),
             (np.where(rng.random((300, 512)) < 0.9, -np.inf, rng.normal(size=(300, 512))), 4)]
    for x, k in cases:
        pre = torch.from_numpy(x.astype(np.float32))
        idx = torch.from_numpy(np.stack([rng.permutation(pre.shape[1])[:k] for _ in range(len(pre))]))
        picks = {}
        for mode in BACKENDS:
            with kernels_backend.forced(mode):
                assert kernels_backend.active() == mode
                top = kernels.topk(pre, k)
                pairs = kernels.pairs_by_latent(idx, pre.shape[1])
            picks[mode] = (top.indices, top.values, pairs)
        (i1, v1, p1), (i2, v2, p2) = picks["numba"], picks["torch"]
        assert torch.equal(i1, i2) and torch.equal(v1, v2)  # the same set, even in the same order
        for f in ("order", "tokens", "crow"):
            assert torch.equal(getattr(p1, f), getattr(p2, f)), f


@needs_numba
def test_topk_from_concurrent_threads_on_every_threading_layer():
    # numba's fallback "workqueue" layer aborts the process on concurrent parallel calls; the kernel
    # serialises them. Run where that layer is forced, as on a machine without OpenMP or TBB.
    code = """
from concurrent.futures import ThreadPoolExecutor
import numpy as np, torch
from tide_core import kernels
torch.set_num_threads(2)
rng = np.random.default_rng(3)
blocks = [torch.from_numpy(rng.normal(size=(600, 256)).astype(np.float32)) for _ in range(6)]
with ThreadPoolExecutor(3) as pool:  # e.g. dask threads each asking for a two-thread top-k
    for x, top in zip(blocks, pool.map(lambda x: kernels.topk(x, 16), blocks)):
        want = x.topk(16, dim=1).values.sort(1).values
        assert torch.equal(top.values.sort(1).values, want)
import numba
assert numba.threading_layer() == "workqueue", numba.threading_layer()
print("ok")
"""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue", "NUMBA_NUM_THREADS": "2",
           "TIDE_KERNELS": "numba"}
    out = _python(code, env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@needs_numba
def test_openmp_is_chosen_at_the_first_parallel_launch_not_at_import():
    code = """
import numba, torch
default = list(numba.config.THREADING_LAYER_PRIORITY)
from tide_core import features, kernels, sae  # noqa: F401
assert numba.config.THREADING_LAYER_PRIORITY == default, "changed at import"
torch.set_num_threads(1)
kernels.topk(torch.randn(600, 64), 8)  # one thread: no parallel launch
assert numba.config.THREADING_LAYER_PRIORITY == default, "changed by a serial call"
torch.set_num_threads(2)
kernels.topk(torch.randn(600, 64), 8)
print(numba.config.THREADING_LAYER_PRIORITY[0], numba.threading_layer())
"""
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "TIDE_KERNELS": "numba"}
    env.pop("NUMBA_THREADING_LAYER", None)
    env.pop("NUMBA_THREADING_LAYER_PRIORITY", None)
    out = _python(code, env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "omp", out.stdout
    # a layer the user chose stays theirs
    env["NUMBA_THREADING_LAYER"] = "workqueue"
    out = _python(code, env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[1] == "workqueue" and out.stdout.split()[0] != "omp", out.stdout


@needs_numba
def test_a_failed_compile_falls_back_with_one_warning(monkeypatch):
    from numba.core.errors import LoweringError

    from tide_core.kernels import numba_features, numba_topk

    def broken() -> None:
        raise LoweringError("intrinsic llvm.x86.test not found (forced for the test)")

    for table, group in ((numba_topk.WARM_UP, "topk"), (numba_topk.WARM_UP, "pairs"),
                         (numba_features.WARM_UP, "features")):
        monkeypatch.setitem(table, group, broken)
    x = torch.from_numpy(np.round(np.random.default_rng(6).normal(size=(300, 128)) * 2).astype(np.float32))
    with kernels_backend.forced("torch"):
        want = kernels.topk(x, 8)
    with kernels_backend.forced("auto"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = kernels.topk(x, 8)
        again = kernels.topk(x, 8)
        kernels.pairs_by_latent(first.indices, 128)
        kernels.top_images(np.ones((2, 3), np.float32), np.arange(3), 2)
        assert kernels_backend.active() == "torch"
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "forced for the test" in message and "TIDE_KERNELS=torch" in message, message
    for got in (first, again):
        assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)
    # asked for explicitly, the compiled kernels do not fall back silently
    with kernels_backend.forced("numba"), pytest.raises(RuntimeError, match="TIDE_KERNELS=numba"):
        kernels.topk(x, 8)


def test_an_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TIDE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="TIDE_KERNELS='cuda' is not one of auto, numba, torch"):
        kernels_backend.requested_mode()


def test_a_stale_kernel_cache_is_wiped_before_the_first_compile(tmp_path, monkeypatch):
    # numba's cache keys each kernel on its own file; an edit to simd.py changes the source stamp, and
    # the package's cache files go before anything is compiled (other files in the directory stay)
    stale = [tmp_path / "numba_topk._topk_block-165.py311.nbi",
             tmp_path / "numba_topk._topk_block-165.py311.1.nbc",
             tmp_path / "numba_features._accumulate-60.py311.nbi"]
    other = tmp_path / "somebody_else.kernel-3.py311.nbi"
    for f in [*stale, other]:
        f.write_bytes(b"old")
    (tmp_path / kernels_backend.STAMP_FILE).write_text("a stamp of other sources\n")
    fake_module = SimpleNamespace(kernel=SimpleNamespace(_cache=SimpleNamespace(cache_path=str(tmp_path))))
    monkeypatch.setattr(kernels_backend, "_cache_checked", False)
    kernels_backend._check_cache(fake_module)
    assert not any(f.exists() for f in stale) and other.exists()
    assert (tmp_path / kernels_backend.STAMP_FILE).read_text().strip() == kernels_backend.source_stamp()
    # the stamp matches: a second process keeps the (fresh) cache
    stale[0].write_bytes(b"fresh")
    monkeypatch.setattr(kernels_backend, "_cache_checked", False)
    kernels_backend._check_cache(fake_module)
    assert stale[0].exists()


def test_torch_backend_never_imports_numba():
    code = """
import sys
import numpy as np, torch
from tide_core import kernels
from tide_core.features import chunk_partial
from tide_core.sae import SAESpec, SparseAutoencoder
torch.set_num_threads(2)
top = kernels.topk(torch.randn(600, 256), 8)
kernels.pairs_by_latent(top.indices, 256)
sae = SparseAutoencoder(SAESpec(d_in=8, n_latents=32, k=4, variant="tide"), seed=0)
acts = np.random.default_rng(0).normal(size=(4, 6, 8)).astype(np.float32)
part = chunk_partial(sae, acts, 0, 500, np.arange(4), np.arange(4) % 2, 2, 3)
assert part.fires.sum() > 0
assert "numba" not in sys.modules and "llvmlite" not in sys.modules, "numba was imported"
print("ok")
"""
    env = {**os.environ, "TIDE_KERNELS": "torch"}
    out = _python(code, env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@needs_numba
def test_kernels_compiled_for_a_cpu_without_avx512(tmp_path):
    # On AVX-512 the compresses use vcompressps on registers; elsewhere LLVM's generic lowering of the
    # same IR. Compile everything for a baseline x86-64 CPU (own cache dir) and run the exactness checks
    # and the feature pass's fused-path checks there.
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path),
           "TIDE_KERNELS": "numba"}
    tests = ["tests/test_topk.py::test_topk_is_exact", "tests/test_topk.py::test_topk_masked_rows_and_nan",
             "tests/test_topk.py::test_topk_many_ties_match_a_stable_sort",
             "tests/test_topk.py::test_topk_exact_when_the_running_guess_is_wrong",
             "tests/test_features.py::test_fused_topk_counts_equal_the_general_path",
             "tests/test_features.py::test_the_backends_give_the_same_statistics"]
    probe = "from tide_core.kernels import simd; assert not simd._AVX512"
    assert subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, timeout=120).returncode == 0
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not torch",
                          *tests], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
