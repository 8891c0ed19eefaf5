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
    # rerun on the same store under the same config: the checkpoints and published numbers are reused
    logs: list[str] = []
    reused = sae_ops.train_layer(project, 1, log=logs.append)
    assert any("reusing them" in m for m in logs)
    for old, new in zip(report.reports, reused.reports, strict=True):
        assert (new.sae_id, new.path, new.tokens_seen) == (old.sae_id, old.path, old.tokens_seen)
        assert new.metrics["heldout"][-1]["nmse"] == pytest.approx(old.metrics["heldout"][-1]["nmse"])
        assert new.splice == pytest.approx(old.splice)
    # any change to the SAE config (here only its seed, so the same ids) trains again
    reseeded = tiny_project({"sae": {**SAE["sae"], "seed": 1}})
    reseeded = type(reseeded)(config=reseeded.config, config_path=project.config_path, base_dir=project.base_dir)
    logs.clear()
    retrained = sae_ops.train_layer(reseeded, 1, log=logs.append)
    assert not any("reusing" in m for m in logs)
    assert {r.sae_id for r in retrained.reports} == {r.sae_id for r in report.reports}


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


def test_adaln_modulation_is_what_the_next_block_applies():
    import torch
    from torch.nn import functional as F

    from tide_core.adaln import adaln_modulation
    from tide_core.config import DigitsDiTConfig
    from tide_core.dit import build_digits_dit

    model = build_digits_dit(DigitsDiTConfig(num_layers=2, num_heads=2, head_dim=16)).eval()
    for p in model.parameters():  # adaLN-Zero starts at zero: give it something to reproduce
        torch.nn.init.normal_(p, std=0.05)
    t = torch.tensor([3, 500, 999])
    mod = adaln_modulation(model, 0, t, null_class=10)  # [3, 2d] scale, shift of block 1
    scale, shift = mod.chunk(2, dim=1)
    x = torch.randn(3, 64, 32)
    with torch.no_grad():
        out = model.transformer_blocks[1].norm1(x, timestep=t, class_labels=torch.full_like(t, 10))[0]
    expected = F.layer_norm(x, (32,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert adaln_modulation(model, 1, t, 10).shape == (3, 64)  # last block: the final norm's modulation


def test_tide_modulation_can_start_from_the_dit_adaln(tiny_project):
    import torch

    from tide_core.sae import SAESpec, SparseAutoencoder

    project = captured(tiny_project({"sae": {**SAE["sae"], "tide_init": "adaln", "variants": ["tide"],
                                             "splice_samples": 0}}))
    sae = SparseAutoencoder(SAESpec(d_in=32, n_latents=64, k=4, variant="tide"), seed=0)
    fit = sae_ops.init_from_adaln(project, sae, 0, 1000)
    assert fit < 1e-2 and sae.meta["time_init"] == "adaln"
    emb_before = torch.zeros(())  # the zero-initialised last layer no longer is
    assert not torch.equal(sae.time_mlp[2].weight, emb_before.expand_as(sae.time_mlp[2].weight))
    report = sae_ops.train_layer(project, 0, log=lambda m: None)
    assert report.reports[0].metrics["heldout"][-1]["cosine"] > 0


@pytest.mark.slow
def test_killed_layer_resumes_from_its_saved_state(tiny_project, monkeypatch):
    project = captured(tiny_project(SAE))
    evaluate = sae_ops.evaluate_sae

    def killed(*args, **kwargs):  # the kill lands after training, before anything is published
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(sae_ops, "evaluate_sae", killed)
    with pytest.raises(KeyboardInterrupt):
        sae_ops.train_layer(project, 1, log=lambda m: None)
    monkeypatch.setattr(sae_ops, "evaluate_sae", evaluate)
    logs: list[str] = []
    report = sae_ops.train_layer(project, 1, log=logs.append)
    assert any(m.startswith("resuming layer 1 SAEs") for m in logs), logs[:1]
    assert not any("reusing" in m for m in logs)  # trained but never published: not reused
    assert all(r.tokens_seen >= 12000 for r in report.reports)
    assert not list((project.root / "saes" / "_state").glob("L01-*"))  # cleaned up once finished
