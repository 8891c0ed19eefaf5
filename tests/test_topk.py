"""The compiled top-k and pair grouping of tide_core.topk against torch and numpy references."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tide_core.sae import topk_exact
from tide_core.topk import pairs_by_latent, topk_rows


def _check(x: np.ndarray, k: int, threads: int = 1) -> np.ndarray:
    top = topk_rows(x, k, threads=threads)
    assert top.ok
    want = np.sort(np.partition(x, x.shape[1] - k, axis=1)[:, x.shape[1] - k:], axis=1)
    np.testing.assert_array_equal(np.sort(top.values, axis=1), want)
    np.testing.assert_array_equal(np.take_along_axis(x, top.indices, 1), top.values)
    assert (np.diff(np.sort(top.indices, axis=1), axis=1) > 0).all()  # distinct positions
    return top.indices


@pytest.mark.parametrize("n,k", [(1024, 32), (100, 16), (64, 63), (257, 1), (40, 40)])
def test_topk_rows_is_exact(n, k):
    rng = np.random.default_rng(0)
    _check(rng.normal(size=(300, n)).astype(np.float32), k)
    _check(-np.abs(rng.normal(size=(300, n))).astype(np.float32), k)  # all negative: the int key flip
    _check(rng.normal(size=(600, n)).astype(np.float32), k, threads=2)  # rows split over two threads


def test_topk_rows_ties_go_to_the_lowest_position():
    x = np.zeros((8, 128), np.float32)
    x[:, 100:] = 1.0  # 28 ones, 100 zeros: top-32 = the ones and the first four zeros
    idx = np.sort(_check(x, 32), axis=1)
    np.testing.assert_array_equal(idx, np.tile(np.r_[0:4, 100:128], (8, 1)))


def test_topk_rows_masked_rows_and_nan():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 256)).astype(np.float32)
    masked = np.where(rng.random(x.shape) < 0.95, -np.inf, x).astype(np.float32)  # AuxK's dead-only rows
    masked[:, :8] = x[:, :8]  # at least k finite entries per row
    _check(masked, 8)
    x[3, 17] = np.nan
    assert not topk_rows(x, 8).ok
    # topk_exact falls back to torch.topk for the batch, which ranks NaN as the largest value
    sel = topk_exact(torch.from_numpy(x), 8)
    assert bool(torch.isnan(sel.values[3]).any())
    rest = torch.from_numpy(np.delete(x, 3, axis=0))
    got = torch.from_numpy(np.sort(np.delete(sel.values.numpy(), 3, axis=0), axis=1))
    assert torch.equal(got, rest.topk(8, dim=1).values.sort(1).values)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        topk_rows(x, 300)


def test_pairs_by_latent_is_a_stable_sort():
    rng = np.random.default_rng(2)
    idx = np.stack([rng.choice(300, 12, replace=False) for _ in range(200)])  # [B, k] distinct per row
    p = pairs_by_latent(idx, 300)
    np.testing.assert_array_equal(p.order, np.argsort(idx.reshape(-1), kind="stable"))
    np.testing.assert_array_equal(p.tokens, p.order // 12)
    np.testing.assert_array_equal(p.crow, np.r_[0, np.cumsum(np.bincount(idx.reshape(-1), minlength=300))])


def test_topk_rows_from_concurrent_threads_on_every_threading_layer():
    # numba's fallback "workqueue" layer aborts the process on concurrent parallel calls; topk_rows
    # serialises them. Run where that layer is forced, as on a machine without OpenMP or TBB.
    code = """
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from tide_core.topk import topk_rows
rng = np.random.default_rng(3)
blocks = [rng.normal(size=(600, 256)).astype(np.float32) for _ in range(6)]
with ThreadPoolExecutor(3) as pool:  # e.g. dask threads each asking for a two-thread top-k
    for x, top in zip(blocks, pool.map(lambda x: topk_rows(x, 16, threads=2), blocks)):
        want = np.sort(np.partition(x, 240, axis=1)[:, 240:], axis=1)
        assert top.ok and (np.sort(top.values, axis=1) == want).all()
print("ok")
"""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue", "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("n,k", [(1024, 32), (96, 7), (64, 40)])
def test_topk_rows_many_ties_match_a_stable_sort(n, k):
    # integers: most values repeat, so the k-th value is tied in nearly every row; the selection must be
    # exactly what a stable descending sort takes (equal values, lower position first)
    x = np.round(np.random.default_rng(3).normal(size=(400, n)) * 2).astype(np.float32)
    want = np.sort(np.argsort(-x, axis=1, kind="stable")[:, :k], axis=1)
    np.testing.assert_array_equal(np.sort(_check(x, k), axis=1), want)


def test_topk_rows_exact_when_the_running_guess_is_wrong():
    # rows are screened with a guess from earlier rows' k-th values; rows on wildly different scales make
    # the guess too high (fewer than k kept: the exact group bound takes over) or far too low
    rng = np.random.default_rng(4)
    scale = 10.0 ** rng.uniform(-3, 3, size=(500, 1))
    shift = rng.normal(size=(500, 1)) * scale * 3
    _check((rng.normal(size=(500, 1024)) * scale + shift).astype(np.float32), 32)
    _check((rng.normal(size=(500, 96)) * scale + shift).astype(np.float32), 40)  # k > 32: no group bound


def test_kernels_compiled_for_a_cpu_without_avx512(tmp_path):
    # On AVX-512 the compresses use vcompressps on registers; elsewhere LLVM's generic lowering of the
    # same IR. Compile everything for a baseline x86-64 CPU (own cache dir) and run the exactness checks
    # and the feature pass's fused-path check there.
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path)}
    tests = ["tests/test_topk.py::test_topk_rows_is_exact", "tests/test_topk.py::test_topk_rows_masked_rows_and_nan",
             "tests/test_topk.py::test_topk_rows_many_ties_match_a_stable_sort",
             "tests/test_topk.py::test_topk_rows_exact_when_the_running_guess_is_wrong",
             "tests/test_features.py::test_fused_topk_counts_equal_the_general_path"]
    probe = "from tide_core import simd; assert not simd._AVX512"
    root = Path(__file__).resolve().parent.parent
    assert subprocess.run([sys.executable, "-c", probe], env=env, cwd=root, timeout=120).returncode == 0
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
