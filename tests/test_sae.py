"""SAE model, trainer and metrics: tiny CPU problems, a few seconds in all."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from kernel_backends import BACKENDS, use_backend

from bench.references import DenseTopKReference
from tide_core.kernels import backend as kernels_backend
from tide_core.kernels import topk
from tide_core.sae import (
    CONFIG_FILE,
    SAEDesign,
    SAESpec,
    SAETrainConfig,
    SAETrainer,
    SparseAutoencoder,
    TokenBatch,
    evaluate,
    lr_at,
    rebatch,
    skip_tokens,
    timestep_embedding,
    train_saes,
)

D_IN, N_DIRS, N_STEPS = 32, 64, 8

backend = pytest.fixture(params=BACKENDS)(use_backend)


pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic(n_tokens: int, chunk: int, seed: int, shift: float = 1.0):
    """Tokens = 2 of 64 fixed unit directions in d=32, then a per-step scale and shift (an affine distortion
    that depends on the timestep). The dictionary is fixed; ``seed`` only changes which tokens are drawn."""
    g = torch.Generator().manual_seed(123)
    dirs = torch.nn.functional.normalize(torch.randn(N_DIRS, D_IN, generator=g), dim=1)  # [64, 32]
    scale = 0.5 + 1.5 * torch.rand(N_STEPS, 1, generator=g)  # [S, 1]
    offset = shift * torch.randn(N_STEPS, D_IN, generator=g)  # [S, 32]
    g.manual_seed(seed)
    for _ in range(n_tokens // chunk):
        idx = torch.rand(chunk, N_DIRS, generator=g).topk(2, dim=1).indices
        coef = torch.zeros(chunk, N_DIRS).scatter_(1, idx, 0.5 + torch.rand(chunk, 2, generator=g))
        step = torch.randint(N_STEPS, (chunk,), generator=g)  # [chunk]
        x = (coef @ dirs) * scale[step] + offset[step]  # [chunk, 32]
        yield TokenBatch(x, 999 - 125 * step, step)


def _sae(variant: str = "topk", n_latents: int = 256, k: int = 8, seed: int = 0, **kw) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAESpec(d_in=D_IN, n_latents=n_latents, k=k, variant=variant, **kw), seed=seed)
    sae.init_from_sample(next(_synthetic(512, 512, seed=99)).acts)
    return sae


def _batch(n: int = 64, seed: int = 1) -> TokenBatch:
    return next(_synthetic(n, n, seed=seed)).to_torch()


# --- spec -------------------------------------------------------------------------------------------------


def test_spec_errors_name_the_field():
    with pytest.raises(ValueError, match=r"k=9 must be <= n_latents=8"):
        SAESpec(d_in=4, n_latents=8, k=9)
    with pytest.raises(ValueError, match=r"k=9 must be <= n_latents=8"):
        SAEDesign(n_latents=8, k=9)
    with pytest.raises(ValueError, match="d_in"):
        SAESpec(d_in=0, n_latents=8, k=1)
    with pytest.raises(ValueError, match="time_embed_dim=5 must be even"):
        SAEDesign(n_latents=8, k=1, time_embed_dim=5)
    with pytest.raises(ValueError, match="aux_k=9 must be <= n_latents=8"):
        SAEDesign(n_latents=8, k=1, aux_k=9)
    with pytest.raises(ValueError, match="time_init"):
        SAEDesign(time_init="dit")
    with pytest.raises(ValueError, match="warmup_tokens=100 must be < total_tokens=100"):
        SAETrainConfig(total_tokens=100, warmup_tokens=100)
    with pytest.raises(ValueError, match="init_tokens=16384 must be <= total_tokens=10000"):
        SAETrainConfig(total_tokens=10_000, warmup_tokens=0)
    assert SAESpec(d_in=128, n_latents=1024, k=32).aux_k == 64  # ~d_in / 2
    assert SAESpec(d_in=8, n_latents=16, k=4).aux_k == 4  # at least k


def test_design_binds_to_a_spec_with_one_set_of_defaults():
    design = SAEDesign()
    assert (design.n_latents, design.k) == (1024, 32)
    assert (design.dead_tokens_threshold, design.aux_coeff) == (10_000, 0.5)  # the tuned AuxK settings
    assert design.aux_k is None and design.time_init == "identity"
    spec = SAEDesign(n_latents=256, k=8, l1_coeff=0.1).bind(128, "relu", num_train_timesteps=500)
    assert isinstance(spec, SAESpec) and spec.aux_k == 64  # resolved where d_in is known
    assert (spec.d_in, spec.variant, spec.num_train_timesteps, spec.l1_coeff) == (128, "relu", 500, 0.1)
    assert spec.design == SAEDesign(n_latents=256, k=8, l1_coeff=0.1, aux_k=64)
    assert SAESpec(d_in=128) == SAEDesign().bind(128)  # the same defaults either way
    with pytest.raises(ValueError, match="variant"):
        design.bind(128, "sparse")
    with pytest.raises(ValueError, match="extra"):
        SAEDesign(d_in=128)  # data-bound fields belong to the spec


# --- forward, sparsity, sparse == dense -------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["tide", "topk", "relu"])
def test_shapes(variant):
    sae, b = _sae(variant), _batch()
    out = sae(b.acts, b.timesteps)
    assert out.x_hat.shape == (64, D_IN)
    assert out.dense_latents().shape == (64, 256)
    assert sae.encode(b.acts, b.timesteps).shape == (64, 256)
    assert sae.decode(sae.encode(b.acts, b.timesteps)).shape == (64, D_IN)
    loss = sae.loss(b.acts, b.timesteps)
    assert loss.total.ndim == 0 and torch.isfinite(loss.total)
    assert (loss.l1 > 0) == (variant == "relu")


def test_topk_gives_k_nonnegative_latents():
    sae, b = _sae("topk"), _batch()
    z = sae.encode(b.acts)
    assert (z >= 0).all() and ((z > 0).sum(1) <= 8).all()
    with torch.no_grad():
        sae.b_enc.add_(100.0)  # every pre-activation positive: ReLU keeps all k
    z = sae.encode(b.acts)
    assert ((z > 0).sum(1) == 8).all()
    sparse = sae.encode_sparse(b.acts)
    assert sparse.idx.shape == (64, 8) and (sparse.idx.sort(1).values.diff(dim=1) > 0).all()


@pytest.mark.parametrize("n", [512, 100])
def test_topk_matches_torch_topk(backend, n):
    torch.manual_seed(0)
    pre = torch.randn(300, n)
    ties = torch.randint(0, 5, (300, n)).float()  # many exact ties
    masked = pre.masked_fill(torch.rand(300, n) < 0.9, float("-inf"))  # AuxK: only "dead" latents finite
    for x, k in ((pre, 16), (ties, 16), (masked, 4)):
        sel = topk(x, k)
        assert torch.equal(sel.values.sort(1).values, x.topk(k, dim=1).values.sort(1).values)
        assert torch.equal(x.gather(1, sel.indices), sel.values)
        assert (sel.indices.sort(1).values.diff(dim=1) > 0).all()  # distinct latents


def test_sparse_path_equals_dense_reference_values_and_gradients(backend):
    sae = _sae("topk", n_latents=256, k=8)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.W_enc.add_(0.2 * torch.randn_like(sae.W_enc))
    ref = DenseTopKReference.from_sae(sae)
    b = _batch(128)
    ours, theirs = sae.loss(b.acts), ref(b.acts)
    assert ours.aux == 0  # nothing is dead yet
    torch.testing.assert_close(ours.output.x_hat * sae.input_scale, theirs.xs_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.output.dense_latents(), theirs.z, rtol=1e-5, atol=1e-5)
    ours.total.backward()
    theirs.mse.backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).grad, getattr(ref, name).grad, rtol=1e-4, atol=1e-7)


def test_tide_at_init_equals_topk_with_the_same_weights():
    tide, topk, b = _sae("tide"), _sae("topk"), _batch()
    assert torch.equal(tide.W_dec, topk.W_dec) and torch.equal(tide.b_dec, topk.b_dec)
    assert torch.equal(tide(b.acts, b.timesteps).x_hat, topk(b.acts).x_hat)
    assert torch.equal(tide.loss(b.acts, b.timesteps).total, topk.loss(b.acts).total)


def test_tide_without_timesteps_is_a_clear_error():
    sae, b = _sae("tide"), _batch()
    with pytest.raises(ValueError, match="needs the diffusion timestep"):
        sae(b.acts)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        sae(b.acts, torch.full((64,), 1001))


def test_timestep_embedding_is_schedule_length_invariant():
    t = torch.tensor([0, 250, 999])
    torch.testing.assert_close(timestep_embedding(t, 16, 1000), timestep_embedding(t * 2, 16, 2000))


def test_input_scale_normalises_norm_and_api_stays_in_original_scale():
    sae, b = _sae("topk"), _batch(512, seed=99)
    norms = (b.acts * sae.input_scale).norm(dim=1)
    assert abs(norms.mean().item() - D_IN**0.5) < 1e-3
    big = SparseAutoencoder(sae.spec, seed=0)
    big.init_from_sample(b.acts * 1000)
    torch.testing.assert_close(big(b.acts * 1000).x_hat / 1000, sae(b.acts).x_hat, rtol=1e-4, atol=1e-4)


# --- recipe: decoder norms, dead latents ------------------------------------------------------------------


def test_decoder_rows_stay_unit_norm_and_dead_counters_count_tokens():
    sae = _sae("topk", dead_tokens_threshold=100)
    cfg = SAETrainConfig(total_tokens=10_000, batch_size=64, lr=1e-2, warmup_tokens=0, init_tokens=64)
    trainer = SAETrainer({"topk": sae}, cfg)
    for batch in _synthetic(64 * 5, 64, seed=3):
        trainer.train_step(batch)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256), rtol=0, atol=1e-5)
    assert trainer.tokens_seen == 320 and trainer.step == 5
    counters = sae.tokens_since_fired
    assert counters.max() <= 320 and (counters % 64 == 0).all()


def test_aux_loss_only_with_dead_latents(backend):
    sae, b = _sae("topk", dead_tokens_threshold=100), _batch()
    assert sae.loss(b.acts).aux == 0
    with torch.no_grad():
        sae.tokens_since_fired[:200] = 100  # 200 dead latents
    loss = sae.loss(b.acts)
    assert loss.aux > 0
    loss.total.backward()
    assert sae.W_enc.grad[:200].abs().sum() > 0  # dead latents get a gradient through AuxK


@pytest.mark.parametrize("n_dead", [10, 40])  # fewer dead than aux_k=16 (all in), more (top 16 of them)
def test_aux_loss_dense_and_sparse_paths_agree(backend, monkeypatch, n_dead):
    from tide_core.sae import model

    sae, b = _sae("topk", dead_tokens_threshold=100), _batch()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.tokens_since_fired[7:7 + n_dead] = 100
    runs = []
    for width in (0, 100):  # 0: always the sparse path; 100: dense for up to 100 * aux_k dead latents
        monkeypatch.setattr(model, "AUX_DENSE_WIDTH", width)
        sae.zero_grad(set_to_none=True)
        loss = sae.loss(b.acts)
        loss.aux.backward()
        runs.append((loss.aux.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (aux_sparse, grads_sparse), (aux_dense, grads_dense) = runs
    assert aux_sparse > 0
    torch.testing.assert_close(aux_dense, aux_sparse, rtol=1e-5, atol=1e-7)
    for name, grad in grads_sparse.items():
        torch.testing.assert_close(grads_dense[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# --- checkpoints ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["tide", "relu"])
def test_save_load_round_trip(tmp_path, variant):
    sae, b = _sae(variant), _batch()
    with torch.no_grad():
        sae.tokens_since_fired[:3] = 7
    sae.save(tmp_path / "sae", meta={"layer": 3, "site": "resid"})
    sae.save(tmp_path / "sae")  # overwrite in place
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.spec == sae.spec and loaded.meta == {"layer": 3, "site": "resid"}
    assert torch.equal(loaded.input_scale, sae.input_scale) and loaded.input_scale != 1
    assert torch.equal(loaded.tokens_since_fired, sae.tokens_since_fired)
    assert torch.equal(loaded(b.acts, b.timesteps).x_hat, sae(b.acts, b.timesteps).x_hat)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["variant"] == variant and cfg["spec"]["d_in"] == D_IN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temp dirs left behind
    with pytest.raises(ValueError, match=rf"SAE at {tmp_path / 'sae'} expects d_in=32 but the activations have 64"):
        loaded.check_input(64)


def test_checkpoint_without_time_init_still_loads(tmp_path):
    # a cfg.json whose spec has no time_init (and other AuxK settings than the defaults) loads as saved
    sae = _sae("tide")
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / CONFIG_FILE).read_text())
    del cfg["spec"]["time_init"]
    cfg["spec"].update(dead_tokens_threshold=200_000, aux_coeff=1 / 32)
    (tmp_path / "sae" / CONFIG_FILE).write_text(json.dumps(cfg))
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    assert loaded.spec.time_init == "identity" and loaded.spec.dead_tokens_threshold == 200_000
    b = _batch()
    assert torch.equal(loaded(b.acts, b.timesteps).x_hat, sae(b.acts, b.timesteps).x_hat)


def test_a_damaged_checkpoint_names_its_file_and_the_repair(tmp_path):
    from safetensors.torch import load_file, save_file

    from tide_core.sae.checkpoint import WEIGHTS_FILE, CheckpointError

    sae = _sae("tide")
    sae.save(tmp_path / "sae")
    weights = tmp_path / "sae" / WEIGHTS_FILE
    tensors = load_file(str(weights))
    tensors["W_dec"] = tensors["W_dec"][:-1]  # one latent short: another spec's weights
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"W_dec: \(255, 32\) \(the spec makes \(256, 32\)\).*--force sae"):
        SparseAutoencoder.load(tmp_path / "sae")
    weights.write_bytes(weights.read_bytes()[:100])  # torn
    with pytest.raises(CheckpointError, match=rf"{weights} cannot be read"):
        SparseAutoencoder.load(tmp_path / "sae")
    (tmp_path / "sae" / CONFIG_FILE).write_text('{"format": 1, "spec": {"d_in": ')  # torn config
    with pytest.raises(CheckpointError, match="is not a readable SAE config"):
        SparseAutoencoder.load(tmp_path / "sae")


# --- trainer ----------------------------------------------------------------------------------------------


def _train_cfg(**kw) -> SAETrainConfig:
    base = dict(total_tokens=256 * 150, batch_size=256, lr=1e-2, warmup_tokens=256 * 10, init_tokens=1024,
                log_every=50)
    return SAETrainConfig(**(base | kw))


def test_a_variant_and_the_timestep_mlp_can_have_their_own_learning_rates():
    cfg = _train_cfg(total_tokens=100 * 20, batch_size=100, init_tokens=300, warmup_tokens=300, lr=1e-3,
                     variant_lr_scale={"tide": 4.0}, time_lr_scale=0.5)
    specs = {"tide": SAESpec(d_in=D_IN, n_latents=64, k=4, variant="tide"),
             "topk": SAESpec(d_in=D_IN, n_latents=64, k=4, variant="topk")}
    trainer = SAETrainer(specs, cfg)
    trainer.fit(_synthetic(2000, 100, seed=1), max_tokens=1000)
    logs = {name: trainer.optimizers[name].param_groups[0]["lr"] for name in specs}
    assert logs["tide"] == pytest.approx(4 * logs["topk"]) and logs["topk"] == pytest.approx(lr_at(9, cfg))
    time_group = trainer.optimizers["tide"].param_groups[1]  # the timestep MLP learns at half the rate
    assert time_group["lr"] == pytest.approx(logs["tide"] / 2) and len(trainer.optimizers["topk"].param_groups) == 1


def test_resume_equals_uninterrupted(tmp_path):
    cfg = _train_cfg(total_tokens=100 * 20, batch_size=100, init_tokens=300, warmup_tokens=300)
    specs = {"tide": SAESpec(d_in=D_IN, n_latents=128, k=4, variant="tide", dead_tokens_threshold=300),
             "relu": SAESpec(d_in=D_IN, n_latents=128, k=4, variant="relu")}
    straight = SAETrainer(specs, cfg)
    straight.fit(_synthetic(2000, 80, seed=5))  # source chunks (80) differ from batches (100)

    first = SAETrainer(specs, cfg)
    first.fit(_synthetic(2000, 80, seed=5), max_tokens=700)
    assert first.tokens_seen == 700 and not first.complete
    first.save_state(tmp_path / "state")
    resumed = SAETrainer.load_state(tmp_path / "state")
    assert resumed.tokens_seen == 700 and resumed.step == 7
    results = resumed.fit(skip_tokens(_synthetic(2000, 80, seed=5), resumed.tokens_seen))

    assert results["tide"].complete and results["tide"].tokens_seen == 2000
    assert [r.step for r in results["tide"].logs] == [r.step for r in straight.logs["tide"]]
    for name in specs:
        for (key, a), b in zip(straight.saes[name].state_dict().items(),
                               resumed.saes[name].state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{name}.{key} differs after resume"


def test_training_is_bit_reproducible_on_two_threads():
    # Batches big enough that torch splits the time-MLP gradient over threads (grain 32k elements).
    torch.set_num_threads(2)
    cfg = _train_cfg(total_tokens=1024 * 6, batch_size=1024, init_tokens=1024, warmup_tokens=1024)
    spec = {"tide": SAESpec(d_in=D_IN, n_latents=256, k=8, variant="tide", dead_tokens_threshold=1024)}
    runs = []
    for _ in range(2):
        trainer = SAETrainer(spec, cfg)
        trainer.fit(_synthetic(1024 * 6, 1024, seed=3))
        runs.append(trainer.saes["tide"].state_dict())
    for key, a in runs[0].items():
        assert torch.equal(a, runs[1][key]), f"tide.{key} differs between two identical runs"


def test_rebatch_keeps_token_order_whatever_the_source_chunking():
    source = list(_synthetic(1000, 50, seed=2))
    as_numpy = [TokenBatch(b.acts.numpy(), b.timesteps.numpy(), b.steps.numpy()) for b in source]
    out = list(rebatch(as_numpy, 128))
    assert [len(b) for b in out] == [128] * 7 + [104]
    assert torch.equal(torch.cat([b.to_torch().acts for b in out]), torch.cat([b.acts for b in source]))
    duck = [SimpleNamespace(acts=b.acts, timesteps=b.timesteps, steps=b.steps, sample_ids=None) for b in source]
    assert sum(len(b) for b in rebatch(duck, 128)) == 1000  # e.g. the activation store's own batch type
    rest = list(skip_tokens(source, 975))
    assert torch.equal(torch.cat([b.steps for b in rest]), torch.cat([b.steps for b in source])[975:])


@pytest.mark.skipif(os.environ.get("TIDE_KERNELS", "").strip().lower() == "torch",
                    reason="TIDE_KERNELS=torch: the compiled kernels are switched off")
def test_training_is_the_same_on_both_kernel_backends():
    # the pure top-k returns the compiled kernel's entries in its order, so every sum matches
    cfg = _train_cfg(total_tokens=256 * 8, batch_size=256, warmup_tokens=256, init_tokens=256)
    specs = {v: SAESpec(d_in=D_IN, n_latents=128, k=4, variant=v, dead_tokens_threshold=256)
             for v in ("tide", "topk")}
    runs = {}
    for mode in BACKENDS:
        with kernels_backend.forced(mode):
            results = train_saes(specs, _synthetic(2048, 256, seed=2), cfg)
        runs[mode] = {name: r.sae.state_dict() for name, r in results.items()}
    for name, state in runs["numba"].items():
        for key, value in state.items():
            assert torch.equal(value, runs["torch"][name][key]), f"{name}.{key} differs between the backends"


def test_training_reaches_low_nmse_and_tide_matches_topk():
    specs = {v: SAESpec(d_in=D_IN, n_latents=128, k=4, variant=v, dead_tokens_threshold=256 * 20)
             for v in ("tide", "topk")}
    seen = []
    results = train_saes(specs, _synthetic(256 * 150, 256, seed=0), _train_cfg(), progress=seen.append)
    assert len(seen) == 3 and set(seen[-1]) == {"tide", "topk"}
    nmse = {name: evaluate(r.sae, _synthetic(4096, 512, seed=1)).overall.nmse for name, r in results.items()}
    assert nmse["topk"] < 0.1 and nmse["tide"] < 0.1, nmse
    assert nmse["tide"] <= 1.25 * nmse["topk"] + 0.005, nmse  # TIDE at least matches TopK


# --- metrics ----------------------------------------------------------------------------------------------


def test_metrics_are_batch_size_independent_and_consistent():
    sae = _sae("tide", n_latents=128, k=4)
    whole = evaluate(sae, _synthetic(1200, 1200, seed=4))
    rows = torch.cat([b.acts for b in _synthetic(1200, 1200, seed=4)])
    small = evaluate(sae, rebatch(_synthetic(1200, 1200, seed=4), 70))
    assert set(whole.per_step) == set(range(N_STEPS)) and whole.overall.tokens == 1200
    for a, b in [(whole.overall, small.overall)] + [(whole.per_step[s], small.per_step[s]) for s in whole.per_step]:
        for field in ("mse", "nmse", "cosine", "l0", "dead_fraction", "dense_fraction"):
            assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-6, abs=1e-9), field
    assert sum(m.tokens for m in whole.per_step.values()) == 1200
    x_hat = sae(rows, torch.cat([b.timesteps for b in _synthetic(1200, 1200, seed=4)])).x_hat.detach()
    direct = ((rows - x_hat) ** 2).sum() / ((rows - rows.mean(0)) ** 2).sum()
    assert whole.overall.nmse == pytest.approx(direct.item(), rel=1e-5)
    assert whole.overall.explained_variance == pytest.approx(1 - whole.overall.nmse)
    assert whole.overall.l0 <= 4 and np.isclose(whole.fire_counts.sum(), whole.overall.l0 * 1200)
