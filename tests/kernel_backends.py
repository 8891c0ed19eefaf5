"""Run a kernel test under both implementations of tide_core.kernels (compiled and pure torch/numpy).

Each test module declares ``backend = pytest.fixture(params=BACKENDS)(use_backend)``. Under
TIDE_KERNELS=torch (the whole run without numba) the compiled parameter is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tide_core.kernels import backend as kernels_backend

BACKENDS = ["numba", "torch"]


def use_backend(request) -> Iterator[str]:
    if request.param == "numba" and os.environ.get(kernels_backend.ENV, "").strip().lower() == "torch":
        pytest.skip("TIDE_KERNELS=torch: the compiled kernels are switched off for this run")
    with kernels_backend.forced(request.param):
        yield request.param
