"""Shared fixtures: seeding, a tiny config, a tiny trained DiT + judge built once per session, and a guard
that the test suite never touches the repo's own warehouse or Dagster instance."""

from __future__ import annotations

import json
import random
import tomllib
from pathlib import Path

import numpy as np
import pytest

TINY_TOML = """
[model.digits]
num_layers = 2
num_heads = 2
head_dim = 16
train_steps = 30
batch_size = 16
warmup_steps = 5
checkpoint_dir = "dit"
[model.judge]
epochs = 2
quality_samples = 20
[sampling]
num_steps = 4
num_samples = 24
shard_size = 8
batch_size = 8
guidance_scale = 2.0
[capture]
layers = [0, 1]
[sae.spec]
n_latents = 64
k = 4
[sae.train]
total_tokens = 12000
batch_size = 512
warmup_tokens = 1000
init_tokens = 2048
[sae]
eval_tokens = 4000
splice_samples = 8
checkpoint_every_tokens = 5000
"""
REPO = Path(__file__).resolve().parent.parent
USER_STATE = (REPO / "warehouse", REPO / "models")  # the default run's warehouse (its Dagster instance included) and models


def _snapshot() -> dict[str, tuple[int, int]]:
    """Every file under the user's state folders with its size and modification time."""
    out = {}
    for root in USER_STATE:
        for p in root.rglob("*") if root.exists() else ():
            if p.is_file():
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def pytest_sessionstart(session):
    session.config._tide_user_state = _snapshot()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if any test wrote into the repo's warehouse or instance (tests use temporary ones)."""
    before = getattr(session.config, "_tide_user_state", None)
    if before is None:
        return
    after = _snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        print(f"\nthe test suite changed the user's state (tests must use temporary roots): {changed[:10]}")
        session.exitstatus = 1



@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same RNG state (torch, numpy, random)."""
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    torch.set_num_threads(2)
    yield


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dump_toml(data: dict, prefix: str = "") -> str:
    """Just enough TOML for config tests: nested tables of scalars and lists."""
    scalars = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    lines = ([f"[{prefix}]"] if prefix and scalars else []) + scalars
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(dump_toml(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(lines) + "\n"


def write_config(directory: Path, overrides: dict | None = None) -> Path:
    """The tiny config, with `overrides` deep-merged in, written to directory/tide.toml."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tide.toml"
    path.write_text(dump_toml(merge(tomllib.loads(TINY_TOML), overrides or {})))
    return path


@pytest.fixture
def one_thread():
    """One torch thread for the test: bit-exact comparisons, and speed on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A directory holding a tiny trained digits DiT (./dit) and judge (./warehouse/judge), shared by the
    session."""
    from pipelines.context import RunContext
    from pipelines.project import Project
    from pipelines.stages.model import prepare_model, train_judge

    d = tmp_path_factory.mktemp("tiny_model")
    ctx = RunContext(Project.load(write_config(d)), log=lambda m: None)
    prepare_model(ctx)
    train_judge(ctx)
    return d


@pytest.fixture
def tiny_project(tiny_model_dir, tmp_path):
    """A Project in a fresh directory that reuses the session's tiny DiT checkpoint."""
    from pipelines.project import Project

    def make(overrides: dict | None = None, name: str = "run"):
        shared = {"model": {"digits": {"checkpoint_dir": str(tiny_model_dir / "dit")}}}
        project = Project.load(write_config(tmp_path / name, merge(shared, overrides or {})))
        assert tmp_path in project.root.parents  # a temporary warehouse, never the repo's
        (project.root / "judge").mkdir(parents=True, exist_ok=True)
        for f in (tiny_model_dir / "warehouse" / "judge").iterdir():
            (project.root / "judge" / f.name).write_bytes(f.read_bytes())
        return project

    return make


def quiet(project):
    """A run context whose log is silent."""
    from pipelines.context import RunContext

    return RunContext(project, log=lambda m: None)
