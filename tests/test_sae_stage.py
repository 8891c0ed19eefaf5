import numpy as np
import pytest

from pipelines import capture_ops, sae_ops
from storage.activation_store import StoreError
from storage.warehouse import Warehouse

SAE = {"sae": {"n_latents": 64, "k": 4, "train_tokens": 12000, "batch_size": 512, "eval_tokens": 4000,
               "splice_samples": 8, "checkpoint_every_tokens": 5000}}


def captured(project):
    capture_ops.create_store(project)
    for shard in range(project.num_shards):
        capture_ops.write_shard(project, shard)
    return project


def test_split_keeps_heldout_shards_apart(tiny_project):
    store = capture_ops.create_store(tiny_project())
    split = sae_ops.split_samples(store, 0.125)
    assert split.heldout.tolist() == list(range(16, 24))  # the last of 3 shards
    assert not set(split.train) & set(split.heldout)


def test_bad_inputs_fail_before_training(tiny_project):
    project = tiny_project(SAE)
    with pytest.raises(StoreError, match="no activation store"):
        sae_ops.train_layer(project, 1)
    capture_ops.create_store(project)
    with pytest.raises(StoreError, match="incomplete shards"):
        sae_ops.train_layer(project, 1)
    with pytest.raises(StoreError, match="layer 7 was not captured"):
        sae_ops.train_layer(project, 7)


@pytest.mark.slow
def test_layer_trains_evaluates_splices_and_publishes(tiny_project):
    project = captured(tiny_project(SAE))
    report = sae_ops.train_layer(project, 1, log=lambda m: None)
    assert {r.variant for r in report.reports} == {"tide", "topk"}
    for r in report.reports:
        assert r.tokens_seen >= 12000
        held = r.metrics["heldout"]
        assert sorted(held) == [-1, 0, 1, 2, 3]
        assert 0.0 < held[-1]["cosine"] <= 1.0 and held[-1]["l0"] <= 4.0 + 1e-6
        assert r.splice["n_samples"] == 8 and r.splice["pixel_mse"] >= 0
    wh = Warehouse(project.duckdb_path)
    for table in ("saes", "sae_metrics", "sae_splice"):
        assert wh.check_grain(table) == 0
    rows = wh.query("SELECT split, count(*) AS n FROM sae_metrics GROUP BY 1 ORDER BY 1").to_pylist()
    assert rows == [{"split": "heldout", "n": 10}, {"split": "train", "n": 10}]
    # published numbers equal a fresh evaluation of the saved checkpoint
    from tide_core.sae import SparseAutoencoder

    tide = next(r for r in report.reports if r.variant == "tide")
    sae = SparseAutoencoder.load(tide.path)
    store = capture_ops.open_store(project)
    again = sae_ops.evaluate_sae(store, sae, 1, sae_ops.split_samples(store, 0.125), 4000, 0)
    assert np.isclose(again["heldout"][-1]["nmse"], tide.metrics["heldout"][-1]["nmse"], rtol=1e-5)
    # a second run replaces rows rather than adding them
    sae_ops.publish(project, report)
    assert wh.query("SELECT count(*) AS n FROM saes").column("n")[0].as_py() == 2


@pytest.mark.slow
def test_new_sae_config_replaces_the_layer_partition(tiny_project):
    project = captured(tiny_project(SAE))
    first = sae_ops.train_layer(project, 0, log=lambda m: None)
    smaller = tiny_project({"sae": {**SAE["sae"], "k": 2, "splice_samples": 0}})
    smaller = type(smaller)(config=smaller.config, config_path=project.config_path, base_dir=project.base_dir)
    second = sae_ops.train_layer(smaller, 0, log=lambda m: None)
    wh = Warehouse(project.duckdb_path)
    ids = set(wh.query("SELECT sae_id FROM saes").column("sae_id").to_pylist())
    assert ids == {r.sae_id for r in second.reports} and not ids & {r.sae_id for r in first.reports}
    left = wh.query("SELECT count(*) AS n FROM sae_metrics WHERE sae_id NOT IN (SELECT sae_id FROM saes)")
    assert left.column("n")[0].as_py() == 0
