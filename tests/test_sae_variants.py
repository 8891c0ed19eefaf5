"""BatchTopK and Matryoshka (tide_core/sae/selection.py), alone and with TIDE's modulation: the sparse
training path against a plain dense reference written here, the inference threshold, checkpoints, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_sae import D_IN, _batch, _sae, _synthetic, _train_cfg

from tide_core.sae import SAEDesign, SAESpec, SAETrainer, SparseAutoencoder, skip_tokens
from tide_core.sae.selection import batch_topk
from tide_core.sae.spec import default_widths

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed(variant: str, **kw) -> SparseAutoencoder:
    """An SAE whose selection is not the trivial one of a fresh dictionary (biases and encoder moved)."""
    sae = _sae(variant, n_latents=128, k=4, **kw)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=gen)
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=gen))
    return sae


def dense_reference_loss(sae: SparseAutoencoder, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """The batch variants' training loss the plain way: dense pre-activations with autograd, the B*k largest
    of the whole batch kept, every prefix's reconstruction, the mean of their MSEs (nothing dead: no AuxK)."""
    xs = x * sae.input_scale  # [B, d]
    xc = sae._modulate(xs, t) - sae.b_dec  # [B, d]
    pre = F.linear(xc, sae.W_enc, sae.b_enc)  # [B, n]
    flat = pre.detach().reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(x.shape[0] * sae.spec.k).indices] = True
    z = pre.relu() * keep.view_as(pre)  # [B, n]
    losses = []
    for w in sae.spec.nested_widths:
        xs_hat = z[:, :w] @ sae.W_dec[:w] + sae.b_dec  # [B, d] this prefix alone
        losses.append((xs_hat - xs).pow(2).mean())
    return torch.stack(losses).mean()


def test_batch_topk_keeps_the_batch_top_bk_packed_by_token():
    pre = torch.randn(64, 100, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 64)[:, None]
    sel = batch_topk(pre, 6)
    kept = sel.top.values > 0  # [R, 3]: packed rows of k // 2 latents
    assert sel.top.values.shape[1] == 3 and int(kept.sum()) == 64 * 6
    per_token = torch.zeros(64, dtype=torch.long).index_add_(0, sel.rows, kept.sum(1))
    assert per_token[:8].sum() < per_token[-8:].sum()  # unevenly: the large-norm tokens get more
    assert (sel.rows.diff() >= 0).all()
    assert torch.equal(torch.bincount(sel.rows, minlength=64), (per_token + 2) // 3)  # no row more than needed
    want = pre.reshape(-1).topk(64 * 6).values
    torch.testing.assert_close(sel.top.values[kept].sort().values, want.sort().values)
    assert float(sel.threshold) == float(want.min())
    for r in range(len(sel.rows)):  # every kept value sits in its own token's row of pre
        row = pre[sel.rows[r]]
        assert torch.equal(row[sel.top.indices[r][kept[r]]], sel.top.values[r][kept[r]])


@pytest.mark.parametrize("variant", ["batchtopk", "matryoshka", "tide_batchtopk", "tide_matryoshka"])
def test_sparse_training_path_equals_the_dense_reference(variant):
    sae, b = _perturbed(variant), _batch(96)
    if sae.time_mlp is not None:  # a modulation that is not the identity, different per timestep
        with torch.no_grad():
            sae.time_mlp[2].weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    t = b.timesteps if sae.spec.modulated else None
    ours = sae.loss(b.acts, t)
    assert ours.aux == 0 and ours.output.l0().sum() == 96 * 4
    ours.total.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    want = dense_reference_loss(sae, b.acts, t)
    want.backward()
    torch.testing.assert_close(ours.total, want, rtol=1e-5, atol=1e-6)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=f"{variant} grad of {name}")


def test_matryoshka_loss_is_the_mean_over_prefixes_and_mse_the_whole_dictionary():
    sae, b = _perturbed("matryoshka", matryoshka_widths=[16, 64, 128]), _batch(96)
    with torch.no_grad():
        loss = sae.loss(b.acts)
        z, xs = loss.output.dense_latents(), b.acts * sae.input_scale  # [B, n], [B, d]
        mses = [((z[:, :w] @ sae.W_dec[:w] + sae.b_dec) - xs).pow(2).mean() for w in (16, 64, 128)]
    torch.testing.assert_close(loss.total, torch.stack(mses).mean())
    torch.testing.assert_close(loss.mse, mses[-1])


def test_inference_uses_the_threshold_so_an_image_does_not_depend_on_its_batch():
    cfg = _train_cfg(total_tokens=256 * 30, batch_size=256, init_tokens=512, warmup_tokens=256)
    trainer = SAETrainer({"b": SAESpec(d_in=D_IN, n_latents=128, k=4, variant="batchtopk")}, cfg)
    sae = trainer.fit(_synthetic(256 * 30, 256, seed=4))["b"].sae
    assert torch.isfinite(sae.threshold) and float(sae.threshold) > 0
    x = _batch(50, seed=9).acts
    z = sae.encode(x)  # [50, n]
    pre = sae.encoder_input(x) @ sae.W_enc.detach().t() + sae.b_enc.detach()  # [50, n]
    torch.testing.assert_close(z, pre * (pre > sae.threshold))
    for i in (0, 17, 49):
        torch.testing.assert_close(sae.encode(x[i:i + 1])[0], z[i])
    assert 1 < float((z > 0).sum(1).float().mean()) < 12  # about k per token: the threshold tracks k
    torch.testing.assert_close(sae(x).x_hat, sae.decode(z))


def test_threshold_is_a_running_average_of_the_batch_thresholds():
    sae = _sae("batchtopk", threshold_rate=0.25)
    assert sae.threshold == -torch.inf  # never trained: every positive pre-activation fires
    x = _batch().acts
    pre = sae.encoder_input(x) @ sae.W_enc.detach().t() + sae.b_enc.detach()
    torch.testing.assert_close(sae.encode(x), pre.relu())
    sae.record_threshold(torch.tensor(2.0))
    assert float(sae.threshold) == 2.0  # the first batch sets it
    sae.record_threshold(torch.tensor(1.0))
    assert float(sae.threshold) == pytest.approx(2.0 - 0.25)


def test_tide_batch_variants_need_timesteps_and_start_as_their_plain_form():
    plain, tide, b = _sae("matryoshka"), _sae("tide_matryoshka"), _batch()
    with pytest.raises(ValueError, match="tide_matryoshka.*timestep"):
        tide.loss(b.acts)
    assert torch.equal(plain.loss(b.acts).total, tide.loss(b.acts, b.timesteps).total)


def test_checkpoint_keeps_the_threshold_and_the_widths(tmp_path):
    sae = _sae("tide_matryoshka", matryoshka_widths=[32, 256])
    sae.record_threshold(torch.tensor(0.7))
    sae.save(tmp_path / "s")
    back = SparseAutoencoder.load(tmp_path / "s")
    assert float(back.threshold) == pytest.approx(0.7) and back.spec.matryoshka_widths == [32, 256]
    b = _batch()
    assert torch.equal(back(b.acts, b.timesteps).x_hat, sae(b.acts, b.timesteps).x_hat)


def test_resume_equals_uninterrupted_for_the_batch_variants(tmp_path):
    cfg = _train_cfg(total_tokens=100 * 20, batch_size=100, init_tokens=300, warmup_tokens=300)
    specs = {v: SAESpec(d_in=D_IN, n_latents=128, k=4, variant=v, dead_tokens_threshold=300)
             for v in ("batchtopk", "tide_matryoshka")}
    straight = SAETrainer(specs, cfg)
    straight.fit(_synthetic(2000, 80, seed=5))
    first = SAETrainer(specs, cfg)
    first.fit(_synthetic(2000, 80, seed=5), max_tokens=700)
    first.save_state(tmp_path / "state")
    resumed = SAETrainer.load_state(tmp_path / "state")
    resumed.fit(skip_tokens(_synthetic(2000, 80, seed=5), resumed.tokens_seen))
    for name in specs:
        for key, a in straight.saes[name].state_dict().items():
            assert torch.equal(a, resumed.saes[name].state_dict()[key]), f"{name}.{key} differs after resume"


def test_matryoshka_widths_default_and_errors():
    assert default_widths(1024, 32) == [64, 128, 256, 512, 1024]
    assert default_widths(128, 16) == [16, 32, 64, 128]
    assert SAEDesign(n_latents=1024).bind(64, "matryoshka").matryoshka_widths == [64, 128, 256, 512, 1024]
    assert SAEDesign(n_latents=1024).bind(64, "batchtopk").nested_widths == [1024]
    with pytest.raises(ValueError, match="ending at n_latents=1024"):
        SAEDesign(n_latents=1024, matryoshka_widths=[64, 512])
    with pytest.raises(ValueError, match="ascending"):
        SAEDesign(n_latents=1024, matryoshka_widths=[512, 64, 1024])


def test_batch_variants_train_publish_and_get_feature_statistics(tiny_project):
    """The stages with the batch variants: one training pass for all, `saes` rows, the feature pass's
    fire rates equal to the SAE's own thresholded encode of every stored token."""
    import numpy as np

    from pipelines.stages import capture, features
    from pipelines.stages import sae as sae_stage
    from storage import Warehouse
    from tests.conftest import quiet

    variants = ["batchtopk", "tide_matryoshka"]
    project = tiny_project({"sae": {"variants": variants, "train": {"total_tokens": 6000}, "eval_tokens": 2000,
                                    "splice_samples": 4, "spec": {"matryoshka_widths": [16, 64]}},
                            "features": {"top_n": 4, "neighbors": 3}})
    ctx = quiet(project)
    capture.create_store(ctx)
    for shard in range(project.num_shards):
        capture.write_shard(ctx, shard)
    report = sae_stage.train_layer(ctx, 1, "resid")
    assert [r.variant for r in report.reports] == variants
    for r in report.reports:
        held = r.metrics["heldout"][-1]
        assert 0.3 < held["cosine"] <= 1.0 and 0 < held["l0"] < 64 and r.splice.loss_recovered is not None
    features.build_feature_stats(ctx, 1, "resid")
    wh = Warehouse(ctx.project.duckdb_path)
    rows = wh.query("SELECT sae_id, variant FROM saes ORDER BY variant").to_pylist()
    assert [r["variant"] for r in rows] == sorted(variants)
    store = ctx.store()
    acts, timesteps = store.array("resid", 1)[:], store.provenance["capture_timesteps"]  # [S, N, P, D]
    for row in rows:
        sae = features.load_sae(wh.require_sae(row["sae_id"]), store)
        fired = sum(int((sae.encode(torch.from_numpy(acts[a].reshape(-1, acts.shape[-1]).astype(np.float32)),
                                    torch.full((acts.shape[1] * acts.shape[2],), timesteps[a])) > 0).sum())
                    for a in range(acts.shape[0]))
        rate = wh.query("SELECT sum(fire_rate) FROM features WHERE sae_id = ?", [row["sae_id"]]).column(0)[0]
        assert fired > 0
        assert rate.as_py() == pytest.approx(fired / acts[..., 0].size, rel=1e-6)
