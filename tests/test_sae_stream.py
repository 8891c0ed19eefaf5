"""Streaming SAE training (sae.stream): the store keeps the held-out shards' activations only, the `sae` stage
samples the training shards again, and the SAEs equal those trained from a full store on the same tokens."""

import numpy as np
import pytest
import torch

from pipelines.stages import capture
from pipelines.stages import sae as sae_stage
from storage import ActivationStore, StoreError, StoreMismatchError, shuffled_token_batches
from tests.conftest import quiet
from tide_core.config import TideConfig
from tide_core.sae import SAETrainer, SparseAutoencoder

FAST = {"splice_samples": 0}  # splicing reads held-out images only: the same either way, and slow


class Counted:
    """An in-memory [S, N, P, D] source that counts the samples it was asked for."""

    def __init__(self, x: np.ndarray):
        self.x, self.shape, self.read = x, x.shape, 0

    def get_orthogonal_selection(self, selection):
        axes, ids = selection
        self.read += len(ids)
        return self.x[axes][:, ids]


def tokens(batches) -> np.ndarray:
    return np.concatenate([b.acts for b in batches])


@pytest.mark.parametrize("order", ["samples", "shards"])
def test_a_stream_started_at_a_token_is_the_rest_of_the_stream_and_skips_what_is_before(order):
    x = np.random.default_rng(0).normal(size=(3, 40, 5, 4)).astype(np.float16)  # [S, N, P, D]
    ids = np.arange(32)  # shards of 8: 0..3

    def stream(start, source):
        return list(shuffled_token_batches(source, np.arange(3), ids, steps=np.arange(3), timesteps=np.arange(3),
                                           batch_size=16, seed=4, epochs=2, block=8, drop_last=True,
                                           order=order, start=start))

    whole = stream(0, Counted(x))
    for start in (0, 7, 120, 121, 500, 959):
        source = Counted(x)
        part = stream(start, source)
        np.testing.assert_array_equal(tokens(part), tokens(whole)[start:])
        # batches end where they end without a start, and the blocks wholly before it are not read
        assert all(len(b.acts) == 16 for b in part[1:]) and (start + len(part[0].acts)) % 16 == 0
        assert source.read == 64 - 8 * (start // 120)
    shard = np.concatenate([b.sample_ids for b in whole]) // 8
    blocks = [set(shard[i:i + 120]) for i in range(0, len(shard), 120)]  # 8 samples x 3 steps x 5 tokens
    if order == "shards":  # one whole shard a block, each shard once an epoch
        assert all(len(b) == 1 for b in blocks) and sorted(min(b) for b in blocks[:4]) == [0, 1, 2, 3]
    else:  # a shard's worth of samples drawn from any shard
        assert max(len(b) for b in blocks) > 1


def test_streaming_configs_that_cannot_work_fail_at_load():
    with pytest.raises(ValueError, match='set sae.shuffle_blocks = "shards"'):
        TideConfig.model_validate({"sae": {"stream": True, "shuffle_blocks": "samples"}})
    with pytest.raises(ValueError, match="at least 2 shards.*lower sampling.shard_size"):
        TideConfig.model_validate({"sae": {"stream": True}, "sampling": {"num_samples": 8, "shard_size": 8}})
    with pytest.raises(ValueError, match=r"remove the \[sweep\] section or set sae.stream = false"):
        TideConfig.model_validate({"sae": {"stream": True}, "sweep": {"layers": [1]}, "capture": {"layers": [1]}})
    cfg = TideConfig.model_validate({"sae": {"stream": True}, "sampling": {"num_samples": 24, "shard_size": 8}})
    assert cfg.first_act_shard() == 2 and cfg.sae.block_order == "shards"


def captured(project):
    ctx = quiet(project)
    capture.create_store(ctx)
    for shard in range(project.num_shards):
        capture.write_shard(ctx, shard)
    return ctx


def weights(report) -> dict[str, dict[str, torch.Tensor]]:
    return {r.variant: SparseAutoencoder.load(r.path).state_dict() for r in report.reports}


def assert_same_saes(a, b, wa=None) -> None:
    wa, wb = wa or weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for variant in wa:
        for name, t in wa[variant].items():
            assert torch.equal(t, wb[variant][name]), (variant, name)
    assert [r.metrics for r in a.reports] == [r.metrics for r in b.reports]
    assert [r.sae_id for r in a.reports] == [r.sae_id for r in b.reports]


def test_the_store_of_a_streaming_run_holds_the_heldout_activations_only(tiny_project):
    ctx = captured(tiny_project({"sae": {"stream": True}}))
    store = ActivationStore.open(ctx.project.store_url, mode="r")
    assert store.layout.acts_from_shard == 2 and store.missing_shards() == []
    chunks = sorted(p.name for p in (ctx.project.root / "activations.zarr" / "acts" / "resid" / "layer_01").glob("c.*"))
    assert chunks == [f"c.{s}.2.0.0" for s in range(4)]  # 4 steps of shard 2; shards 0 and 1 have none
    assert store.images().shape[0] == 24 and (store.images()[:16] > 0).any()  # every shard's images
    with pytest.raises(StoreError, match="stores the activations of samples 16..23 only.*sae.stream = false"):
        store.read_samples("resid", 1, 0, 8)
    with pytest.raises(StoreError, match="sae.stream"):
        store.read_block("resid", 1, 0, 1)
    with pytest.raises(StoreError, match="sae.stream"):
        next(store.iter_token_batches("resid", 1, 64, seed=0, sample_ids=range(16)))
    assert store.read_step("resid", 1, 0).shape == (8, 64, 32)  # the default: what the store holds
    assert {int(i) for b in store.iter_token_batches("resid", 1, 64, seed=0) for i in b.sample_ids} == set(
        range(16, 24))
    assert np.isnan(store.array("resid", 1)[0, 0, 0, 0])  # plain zarr reads an unwritten chunk as NaN, not 0
    # the same store under a config that does not stream: refused before anything samples
    full = tiny_project()
    full = type(full)(config=full.config.model_copy(update={"warehouse": ctx.config.warehouse}),
                      config_path=ctx.project.config_path)
    with pytest.raises(StoreMismatchError, match="layout.acts_from_shard: store has 2, config asks for 0"):
        capture.create_store(quiet(full))


def test_streaming_training_equals_training_from_the_store_on_the_same_tokens(tiny_project):
    stored = sae_stage.train_layer(captured(tiny_project({"sae": {**FAST, "shuffle_blocks": "shards"}}, "store")),
                                   1, "resid")
    streamed = sae_stage.train_layer(captured(tiny_project({"sae": {**FAST, "stream": True}}, "stream")), 1, "resid")
    assert stored.samples_drawn == 0
    # 3 epochs of the 2 training shards (12000 tokens of 4096 a epoch), and the train-split evaluation's 2
    # shards (4000 tokens) once for both variants
    assert streamed.samples_drawn == 8 * (6 + 2)
    assert_same_saes(stored, streamed)


@pytest.mark.slow
def test_a_killed_streaming_layer_resumes_at_its_next_token_and_ends_with_the_same_weights(tiny_project,
                                                                                        monkeypatch):
    ctx = captured(tiny_project({"sae": {**FAST, "stream": True}}))
    straight = sae_stage.train_layer(ctx, 1, "resid")
    straight_weights = weights(straight)  # the resumed run writes the same paths
    save = SAETrainer.save_state

    def killed(self, path):  # the kill lands just after the first checkpoint (5000 tokens, mid-shard)
        save(self, path)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(SAETrainer, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        sae_stage.train_layer(ctx, 1, "resid")
    monkeypatch.setattr(SAETrainer, "save_state", save)
    resumed = sae_stage.train_layer(ctx, 1, "resid")
    assert resumed.resumed_from == 5000
    # tokens 5000.. start in the 3rd shard read (2048 each): 2 read shards skipped, never sampled again
    assert resumed.samples_drawn == straight.samples_drawn - 8 * 2
    assert_same_saes(straight, resumed, straight_weights)


@pytest.mark.slow
def test_the_asset_graph_runs_end_to_end_with_streaming(tiny_project):
    import dagster as dg

    from pipelines.definitions import definitions_for
    from pipelines.runner import materialize
    from pipelines.stages.samples import count_nonfinite
    from storage import Warehouse
    from tests.test_pipelines import ASSETS, EDIT

    project = tiny_project({**EDIT, "sae": {"stream": True}})
    report = materialize(definitions_for(project), dg.DagsterInstance.ephemeral(), log=lambda m: None)
    assert report.success and {s.asset for s in report.steps if s.executed} == ASSETS
    acts = project.root / "activations.zarr" / "acts" / "resid"
    for layer in (0, 1):  # no chunk of a training shard (0, 1) in any array; every step of shard 2
        assert sorted(p.name for p in (acts / f"layer_{layer:02d}").glob("c.*")) == [f"c.{s}.2.0.0" for s in range(4)]
    assert set(count_nonfinite(quiet(project)).values()) == {0}
    wh = Warehouse(project.duckdb_path)
    saes = wh.query("SELECT layer, variant, tokens_seen FROM saes ORDER BY 1, 2").to_pylist()
    assert saes == [{"layer": layer, "variant": v, "tokens_seen": 12000} for layer in (0, 1) for v in ("tide", "topk")]
    # the feature pass read the held-out samples: the top images are among them, and nothing else fired
    tops = wh.query("SELECT min(sample_id) AS lo, max(sample_id) AS hi, count(*) AS n FROM top_images").to_pylist()[0]
    assert tops["n"] > 0 and tops["lo"] >= 16 and tops["hi"] <= 23
    assert wh.query("SELECT count(*) AS n FROM feature_stats").column("n")[0].as_py() > 0
    assert wh.query("SELECT count(*) AS n FROM edits").column("n")[0].as_py() > 0
