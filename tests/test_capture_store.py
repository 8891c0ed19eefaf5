import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipelines.stages import capture
from storage import ActivationStore, StoreError, StoreMismatchError
from tests.conftest import quiet
from tide_core.capture import CaptureSpec, validate_spec
from tide_core.models.registry import load_model
from tide_core.sampling import Sampler, condition_for

SITES = ("resid", "attn", "mlp")


def capture_all(project):
    ctx = quiet(project)
    capture.create_store(ctx)
    for shard in range(project.num_shards):
        capture.write_shard(ctx, shard)
    return ActivationStore.open(project.store_url, mode="r")


@pytest.fixture
def full_store(tiny_project):
    return capture_all(tiny_project())


def fresh_activations(project, sample_id: int, layer: int) -> np.ndarray:
    """Resample one image alone with a plain forward hook: [steps, tokens, D] of the cond branch."""
    cfg = project.config
    model = load_model(cfg.model)
    s = cfg.sampling
    seen = []
    hook = model.transformer.transformer_blocks[layer].register_forward_hook(
        lambda _m, _i, out: seen.append(out[:1].float().numpy()))
    Sampler(model, s.scheduler, s.num_steps, s.guidance_scale, s.seed).sample(
        [sample_id], [condition_for(sample_id, list(range(10)))])
    hook.remove()
    return np.concatenate(seen)  # [S, T, D]


def test_stored_activations_equal_a_fresh_forward_pass(tiny_project, full_store):
    project = tiny_project()
    for sample_id, layer in [(0, 0), (9, 1), (23, 1)]:
        fresh = fresh_activations(project, sample_id, layer)
        stored = full_store.read_samples("resid", layer, sample_id, sample_id + 1)[:, 0]  # [S, T, D]
        np.testing.assert_allclose(stored.astype(np.float32), fresh.astype(np.float16).astype(np.float32),
                                   rtol=5e-3, atol=5e-3)
    meta = full_store.samples()
    assert meta["class_id"].tolist() == [i % 10 for i in range(24)]


def test_same_sample_ids_same_data_for_any_shard_size(tiny_project, full_store):
    other = capture_all(tiny_project({"sampling": {"shard_size": 24}}, name="big_shards"))
    assert other.layout.num_shards == 1 and full_store.layout.num_shards == 3
    for layer in (0, 1):
        np.testing.assert_array_equal(other.read_samples("resid", layer, 0, 24),
                                      full_store.read_samples("resid", layer, 0, 24))
    np.testing.assert_array_equal(other.images(), full_store.images())


def test_token_subsampling_stores_the_drawn_tokens(tiny_project, full_store):
    sub = capture_all(tiny_project({"capture": {"token_fraction": 0.25}}, name="sub"))
    assert sub.layout.tokens_stored == 16 and sub.layout.subsampled
    idx = sub.token_index(0, 24)  # [S, N, P]
    assert idx.shape == (4, 24, 16)
    full = full_store.read_samples("resid", 1, 0, 24)  # [S, N, T, D]
    gathered = np.take_along_axis(full, idx[..., None].astype(np.int64), axis=2)
    np.testing.assert_array_equal(sub.read_samples("resid", 1, 0, 24), gathered)
    assert len({tuple(idx[s, n]) for s in range(4) for n in range(24)}) > 80  # draws differ


def test_plain_zarr_and_xarray_see_the_documented_dimensions(full_store):
    import xarray as xr
    import zarr

    g = zarr.open_group(full_store.url, mode="r")
    assert g["acts/resid/layer_01"].shape == (4, 24, 64, 32)
    assert g["acts/resid/layer_01"].metadata.dimension_names == ("step", "sample", "token", "channel")
    assert g.attrs["provenance"]["capture_timesteps"] == full_store.provenance["capture_timesteps"]
    ds = xr.open_zarr(full_store.url, group="acts/resid", consolidated=False)
    assert dict(ds["layer_00"].sizes) == {"step": 4, "sample": 24, "token": 64, "channel": 32}


def test_readers(full_store):
    x = full_store.read_step("resid", 0, 2)  # [N, P, D]
    assert x.shape == (24, 64, 32)
    d = full_store.dask("resid", 0)
    assert d.chunks[1] == (8, 8, 8)
    np.testing.assert_array_equal(d[2].compute(), x)
    with pytest.raises(StoreError, match="not captured"):
        full_store.read_step("resid", 0, 9)
    with pytest.raises(StoreError, match="was not captured"):
        full_store.read_step("mlp", 0, 1)
    # whole chunks by (step, shard): raw bytes for this uncompressed store, the same values as zarr's
    for shard in range(3):
        block = full_store.read_block("resid", 0, 2, shard)
        np.testing.assert_array_equal(block, x[8 * shard:8 * (shard + 1)])
        assert block.flags.writeable
    # a store pickles as its URL (dask.distributed workers reopen it)
    again = pickle.loads(pickle.dumps(full_store))
    np.testing.assert_array_equal(again.read_block("resid", 1, 3, 1), full_store.read_block("resid", 1, 3, 1))


def test_damaged_chunk_is_a_clear_error(full_store):
    lay = full_store.layout
    shape = (len(lay.shard_range(1)), lay.tokens_stored, lay.d_model)
    key = full_store._plain_chunk_key(full_store.array("resid", 0), (lay.step_axis(2), 1, 0, 0), shape)
    with open(key, "r+b") as f:  # cut short, as by a full disk
        f.truncate(100)
    with pytest.raises(StoreError, match="shard 1 .* its data is damaged. To repair it, delete the shard.s done marker"):
        full_store.read_block("resid", 0, 2, 1)


def test_compressed_store_reads_blocks_through_zarr(tiny_project, full_store):
    packed = capture_all(tiny_project({"capture": {"compression": "zstd"}}, name="zstd"))
    for shard in range(3):
        np.testing.assert_array_equal(packed.read_block("resid", 1, 2, shard),
                                      full_store.read_block("resid", 1, 2, shard))


def test_token_batches_are_shuffled_balanced_and_complete(full_store):
    batches = list(full_store.iter_token_batches("resid", 1, batch_size=256, seed=0))
    steps = np.concatenate([b.steps for b in batches])
    ids = np.concatenate([b.sample_ids for b in batches])
    total = 4 * 24 * 64
    assert len(steps) == total - total % 256
    counts = np.bincount(steps, minlength=4)
    assert counts.min() >= 0.95 * counts.max()
    first = batches[0]
    assert len(np.unique(first.steps)) == 4 and len(np.unique(first.sample_ids)) > 4
    assert np.isin(first.timesteps, full_store.provenance["capture_timesteps"]).all()
    assert set(ids.tolist()) == set(range(24))


def test_incomplete_shard_is_never_read(full_store):
    store = ActivationStore.open(full_store.url)
    store.begin_shard(1)
    with pytest.raises(StoreError, match="shard 1 .* not complete"):
        store.read_samples("resid", 0, 0, 24)
    assert store.missing_shards() == [1]


def test_reopening_with_another_config_says_what_differs(tiny_project, full_store):
    project = tiny_project({"sampling": {"guidance_scale": 3.0}})
    with pytest.raises(StoreMismatchError, match="guidance_scale: store has 2.0, config asks for 3.0"):
        capture.create_store(quiet(project))
    assert ActivationStore.open(full_store.url).done_shards() == [0, 1, 2]  # nothing damaged
    fresh = capture.create_store(quiet(project), overwrite=True)
    assert fresh.done_shards() == []


def test_memory_url_store(tiny_project):
    project = tiny_project({"warehouse": {"store_url": "memory://tide-test/acts.zarr"},
                            "sampling": {"num_samples": 8}})
    store = capture_all(project)
    assert store.url.startswith("memory://") and store.done_shards() == [0]
    assert np.isfinite(store.read_step("resid", 1, 0)).all()


def test_bad_capture_requests_fail_before_sampling(tiny_project):
    with pytest.raises(ValueError, match="layers .* out of range"):
        validate_spec(CaptureSpec(layers=(0, 4)), num_layers=2, sites=SITES, num_steps=4)
    with pytest.raises(ValueError, match="unknown sites"):
        validate_spec(CaptureSpec(layers=(0,), sites=("resid", "qkv")), 2, SITES, 4)
    with pytest.raises(ValueError, match="outside the schedule"):
        validate_spec(CaptureSpec(layers=(0,), steps=frozenset({5})), 2, SITES, 4)
    with pytest.raises(ValueError, match="token_fraction"):
        validate_spec(CaptureSpec(layers=(0,), token_fraction=1.5), 2, SITES, 4)
    project = tiny_project({"warehouse": {"store_url": "/proc/tide-cannot-write/acts.zarr"}})
    with pytest.raises(StoreError, match="cannot write the activation store"):
        capture.create_store(quiet(project))


def test_unconditional_branch_differs_from_conditional(tiny_project):
    cond = capture_all(tiny_project(name="cond", overrides={"sampling": {"num_samples": 8}}))
    unc = capture_all(tiny_project(name="unc", overrides={"sampling": {"num_samples": 8},
                                                          "capture": {"branch": "uncond"}}))
    a, b = cond.read_step("resid", 1, 1), unc.read_step("resid", 1, 1)
    assert a.shape == b.shape and not np.allclose(a, b)


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(tiny_project):
    """`tide run` killed after its first shard resumes without redoing it and equals a clean run."""
    # `tide run` goes on to SAEs, features, edits and the dashboard; keep those small, this test is about
    # the capture shards.
    cheap = {"sae": {"train": {"total_tokens": 6000}, "eval_tokens": 2000, "splice_samples": 0}}
    killed, clean = tiny_project(cheap, name="killed"), tiny_project(cheap, name="clean")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--config"]
    proc = subprocess.Popen(cmd + [str(killed.config_path)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed.root / "activations.zarr" / "shards" / "00000" / "zarr.json"
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    store = ActivationStore.open(killed.store_url, mode="r")
    assert 0 in store.done_shards() and store.missing_shards(), "kill landed after the last shard"
    first_marker = marker.read_bytes()
    resumed = subprocess.run(cmd + [str(killed.config_path)], env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # the shard's run was killed after its done marker, or after Dagster recorded it: reused either way
    said = resumed.stdout + resumed.stderr  # the runner prints to stdout, Dagster's log goes to stderr
    assert ("activations[00000]: up to date, reused" in said
            or "shard 0 is complete in the store (done marker): not sampled again" in said)
    assert marker.read_bytes() == first_marker  # not recomputed
    ok = subprocess.run(cmd + [str(clean.config_path)], env=env, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    a = ActivationStore.open(killed.store_url, mode="r")
    b = ActivationStore.open(clean.store_url, mode="r")
    for layer in (0, 1):
        np.testing.assert_array_equal(a.read_samples("resid", layer, 0, 24), b.read_samples("resid", layer, 0, 24))
    np.testing.assert_array_equal(a.images(), b.images())
    rows = ActivationStore.open(killed.store_url, mode="r")  # and the published table covers every sample once
    from storage import Warehouse

    n = Warehouse(killed.duckdb_path).query("SELECT count(*) AS n, count(DISTINCT sample_id) AS d FROM samples")
    assert n.column("n")[0].as_py() == n.column("d")[0].as_py() == rows.layout.num_samples


def test_attn_and_mlp_sites_are_captured_beside_resid(tiny_project):
    store = capture_all(tiny_project({"sampling": {"num_samples": 8}, "capture": {"sites": ["resid", "attn", "mlp"]}},
                                     name="sites"))
    acts = {site: store.read_step(site, 1, 2) for site in ("resid", "attn", "mlp")}
    assert all(a.shape == (8, 64, 32) for a in acts.values())
    assert not np.allclose(acts["resid"], acts["attn"]) and not np.allclose(acts["attn"], acts["mlp"])
    assert all(np.isfinite(a).all() for a in acts.values())
