"""The SAE stage on a tiny captured store: training, per-step metrics, splicing, publishing, resume."""

import numpy as np
import pytest
import torch

from pipelines.stages import capture
from pipelines.stages import sae as sae_stage
from storage import StoreError, Warehouse
from tests.conftest import quiet
from tide_core.sae import SparseAutoencoder, timestep_embedding


def captured(project):
    ctx = quiet(project)
    capture.create_store(ctx)
    for shard in range(project.num_shards):
        capture.write_shard(ctx, shard)
    return ctx


def test_split_keeps_heldout_shards_apart(tiny_project):
    store = capture.create_store(quiet(tiny_project()))
    split = sae_stage.split_samples(store, 0.125)
    assert split.heldout.tolist() == list(range(16, 24))  # the last of 3 shards
    assert not set(split.train) & set(split.heldout)


def test_missing_store_fails_before_training(tiny_project):
    with pytest.raises(StoreError, match="no activation store"):
        sae_stage.train_layer(quiet(tiny_project()), 1, "resid")


def test_incomplete_store_fails_before_training(tiny_project):
    ctx = quiet(tiny_project())
    capture.create_store(ctx)
    with pytest.raises(StoreError, match="incomplete shards"):
        sae_stage.train_layer(ctx, 1, "resid")


def test_uncaptured_layer_or_site_fails_before_training(tiny_project):
    ctx = quiet(tiny_project())
    capture.create_store(ctx)
    with pytest.raises(StoreError, match=r"\(resid, layer 7\) was not captured"):
        sae_stage.train_layer(ctx, 7, "resid")
    with pytest.raises(StoreError, match=r"\(mlp, layer 1\) was not captured"):
        sae_stage.train_layer(ctx, 1, "mlp")


@pytest.mark.slow
def test_layer_trains_evaluates_splices_and_publishes(tiny_project):
    ctx = captured(tiny_project())
    report = sae_stage.train_layer(ctx, 1, "resid")
    assert {r.variant for r in report.reports} == {"tide", "topk"} and report.resumed_from == 0
    for r in report.reports:
        assert r.tokens_seen == 12000
        held = r.metrics["heldout"]
        assert sorted(held) == [-1, 0, 1, 2, 3]
        assert 0.5 < held[-1]["cosine"] <= 1.0 and held[-1]["l0"] <= 4.0 + 1e-6
        s = r.splice
        assert s.n_samples == 8 and s.loss_ablated > s.loss_clean  # the site matters to the denoiser
        assert s.loss_spliced < s.loss_ablated and s.loss_recovered > 0  # and the SAE keeps part of it
        assert s.accuracy_unspliced is not None  # the digits family has a judge
    wh = Warehouse(ctx.project.duckdb_path)
    for table in ("saes", "sae_metrics", "sae_splice"):
        assert wh.check_grain(table) == 0
    rows = wh.query("SELECT split, count(*) AS n FROM sae_metrics GROUP BY 1 ORDER BY 1").to_pylist()
    assert rows == [{"split": "heldout", "n": 10}, {"split": "train", "n": 10}]
    # published numbers equal a fresh evaluation of the saved checkpoint
    tide = next(r for r in report.reports if r.variant == "tide")
    store = ctx.store()
    again = sae_stage.evaluate_sae(store, SparseAutoencoder.load(tide.path), 1, "resid",
                                   sae_stage.split_samples(store, 0.125), 4000, 0)
    assert np.isclose(again["heldout"][-1]["nmse"], tide.metrics["heldout"][-1]["nmse"], rtol=1e-5)


@pytest.mark.slow
def test_every_captured_site_gets_its_own_saes(tiny_project):
    ctx = captured(tiny_project({"capture": {"layers": [1], "sites": ["resid", "mlp"]},
                                 "sae": {"variants": ["topk"], "splice_samples": 4}}))
    reports = {site: sae_stage.train_layer(ctx, 1, site) for site in ("resid", "mlp")}
    ids = {site: r.reports[0].sae_id for site, r in reports.items()}
    assert ids["mlp"].startswith("L01-mlp-topk") and ids["resid"].startswith("L01-resid-topk")
    rows = Warehouse(ctx.project.duckdb_path).query("SELECT site, count(*) AS n FROM saes GROUP BY 1 ORDER BY 1")
    assert rows.to_pylist() == [{"site": "mlp", "n": 1}, {"site": "resid", "n": 1}]
    assert reports["mlp"].reports[0].splice.loss_recovered > 0  # splicing works at the mlp site too


@pytest.mark.slow
def test_new_sae_config_replaces_the_layer_partition(tiny_project):
    ctx = captured(tiny_project())
    first = sae_stage.train_layer(ctx, 0, "resid")
    smaller = tiny_project({"sae": {"spec": {"k": 2}, "splice_samples": 0}})
    smaller = type(smaller)(config=smaller.config.model_copy(update={"warehouse": ctx.config.warehouse}),
                            config_path=ctx.project.config_path)
    second = sae_stage.train_layer(quiet(smaller), 0, "resid")
    wh = Warehouse(ctx.project.duckdb_path)
    ids = set(wh.query("SELECT sae_id FROM saes").column("sae_id").to_pylist())
    assert ids == {r.sae_id for r in second.reports} and not ids & {r.sae_id for r in first.reports}
    left = wh.query("SELECT count(*) AS n FROM sae_metrics WHERE sae_id NOT IN (SELECT sae_id FROM saes)")
    assert left.column("n")[0].as_py() == 0


def test_tide_modulation_can_start_from_the_dit_adaln(tiny_project):
    ctx = captured(tiny_project({"sae": {"spec": {"time_init": "adaln"}, "variants": ["tide"],
                                         "splice_samples": 0}}))
    report = sae_stage.train_layer(ctx, 0, "resid")
    sae = SparseAutoencoder.load(report.reports[0].path)
    assert sae.spec.time_init == "adaln"
    t = torch.arange(0, 1000, 37)
    target = ctx.model.adaln_modulation(0, t)
    before = torch.zeros_like(target)  # the identity start: scale 0, shift 0
    emb = timestep_embedding(t, sae.spec.time_embed_dim, sae.spec.num_train_timesteps)
    got = sae.time_mlp(emb).detach()
    # training moved it, but it started from the DiT's own modulation, not from zero
    assert (got - target).pow(2).mean() < (before - target).pow(2).mean()


@pytest.mark.slow
def test_killed_layer_resumes_from_its_saved_state(tiny_project, monkeypatch):
    ctx = captured(tiny_project())
    evaluate = sae_stage.evaluate_sae

    def killed(*args, **kwargs):  # the kill lands after training, before anything is published
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(sae_stage, "evaluate_sae", killed)
    with pytest.raises(KeyboardInterrupt):
        sae_stage.train_layer(ctx, 1, "resid")
    monkeypatch.setattr(sae_stage, "evaluate_sae", evaluate)
    report = sae_stage.train_layer(ctx, 1, "resid")
    assert report.resumed_from == 10000  # the last checkpoint before 12000 tokens (every 5000)
    assert all(r.tokens_seen == 12000 for r in report.reports)
    assert not list((ctx.project.saes_dir / "_state").glob("L01-*"))  # cleaned up once finished

