"""The text-conditional family: a tiny random PixArt (built from configs and saved with save_pretrained, the
layout a hub download has) loads through the generic PixArt path; its sites, adaLN target, text masks and
classifier-free guidance halves are checked against plain forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tide_core.capture import ActivationCapture, CaptureSpec
from tide_core.config import ModelConfig, TinyPixArtConfig
from tide_core.models.pixart import PixArt
from tide_core.models.registry import ModelError, family_entry, family_of
from tide_core.models.tiny_pixart import TinyPixArt, build
from tide_core.prompts import Prompt, PromptSet
from tide_core.sampling import Sampler, sample_seed

TINY = TinyPixArtConfig(num_layers=3, num_heads=2, head_dim=8, sample_size=8, text_layers=1, text_width=16)
PROMPTS = PromptSet((Prompt("a red seven"), Prompt("a blue two on a black background"), Prompt("a cat")))


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    return build(TINY, tmp_path_factory.mktemp("pixart") / "tiny")


@pytest.fixture(scope="module")
def model(pixart_dir) -> PixArt:
    cfg = ModelConfig(source=str(pixart_dir), max_prompt_tokens=12, device="cpu")
    return family_of(cfg).load(cfg, PROMPTS, negative_prompt="")


def test_a_saved_directory_is_a_pixart_like_a_hub_download(pixart_dir, model):
    cfg = ModelConfig(source=str(pixart_dir))
    assert family_entry(cfg).name == "pixart" and family_entry(cfg).text
    info = PixArt.describe(cfg)
    assert (info.num_layers, info.hidden_size, info.sites) == (3, 16, ("resid", "attn", "cross", "mlp"))
    assert type(model) is PixArt and model.null_condition == 3 and model.condition_names == PROMPTS.texts
    assert model.latent_shape == (4, 8, 8) and model.image_shape == (16, 16, 3)
    assert (model.token_grid.h, model.token_grid.w) == (4, 4) and model.embeds.shape[:2] == (4, 12)
    with pytest.raises(ModelError, match="set sampling.prompts"):
        PixArt.load(cfg)
    with pytest.raises(ModelError, match="model.height=18 is not a multiple of 4"):
        PixArt.describe(cfg.model_copy(update={"height": 18}))
    with pytest.raises(ModelError, match="lacks text_encoder/"):
        PixArt.describe(ModelConfig(source=str(_without(pixart_dir, "text_encoder"))))


def _without(src, part):
    import shutil

    dst = src.parent / f"without-{part}"
    if not dst.exists():
        shutil.copytree(src, dst, ignore=lambda d, names: [part] if d == str(src) else [])
    return dst


def test_tiny_pixart_builds_deterministically_and_loads_through_pixart(tmp_path):
    cfg = ModelConfig(source="tiny-pixart", device="cpu",
                      tiny_pixart=TINY.model_copy(update={"checkpoint_dir": str(tmp_path / "a")}))
    with pytest.raises(ModelError, match="materialize `dit_model` first"):
        TinyPixArt.load(cfg, PROMPTS)
    first = TinyPixArt.prepare(cfg, log=lambda m: None)
    again = TinyPixArt.prepare(cfg.model_copy(update={"tiny_pixart": TINY.model_copy(
        update={"checkpoint_dir": str(tmp_path / "b")})}), log=lambda m: None)
    assert first.fingerprint == again.fingerprint  # same seed and shape, same weights wherever built
    m = TinyPixArt.load(cfg, PROMPTS)
    assert isinstance(m, PixArt) and m.family == "tiny-pixart" and m.source == str(tmp_path / "a")


def _forward_with_hooks(model: PixArt, x, t, cond, layers):
    """predict_noise with every site of `layers` captured, plus each block's input (a pre-hook)."""
    seen, handles = {}, []
    for layer in layers:
        for site in model.sites:
            mod = model.site_module(layer, site)
            handles.append(mod.register_forward_hook(
                lambda _m, _i, out, key=(site, layer): seen.__setitem__(key, model.read_site(key[0], out))))
        handles.append(model.blocks()[layer].register_forward_pre_hook(
            lambda _m, args, kwargs, layer=layer: seen.__setitem__(("in", layer), args[0] if args else
                                                                   kwargs["hidden_states"]), with_kwargs=True))
        for name in ("attn1", "ff"):  # what the block hands its self-attention and its feed-forward
            handles.append(getattr(model.blocks()[layer], name).register_forward_pre_hook(
                lambda _m, args, key=(name, layer): seen.__setitem__(key, args[0])))
    try:
        with torch.no_grad():
            out = model.predict_noise(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def test_sites_add_up_to_the_block_and_the_last_block_gives_the_noise(model):
    """resid(L) = input + gate_msa * attn + cross + gate_mlp * mlp, with the gates of adaLN-single; the
    mlp's input is norm2(·) modulated by the same table; the last block's output through the output norm
    (scale, shift = adaln_modulation(last)), projection and unpatchify is predict_noise's output. Together
    these pin each site to its module and the tokens to the grid's row-major order."""
    tr = model.transformer
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([900, 40]), torch.tensor([1, 3])
    out, seen = _forward_with_hooks(model, x, t, cond, range(model.num_layers))
    with torch.no_grad():
        emb, embedded = tr.adaln_single(t, {"resolution": None, "aspect_ratio": None}, batch_size=2,
                                        hidden_dtype=torch.float32)  # [B, 6d], [B, d]
        for layer in range(model.num_layers):
            table = model.blocks()[layer].scale_shift_table[None] + emb.reshape(2, 6, -1)  # [B, 6, d]
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table[:, :, None].unbind(1)
            parts = (seen[("in", layer)] + gate_msa * seen[("attn", layer)] + seen[("cross", layer)]
                     + gate_mlp * seen[("mlp", layer)])  # [B, T, d]
            torch.testing.assert_close(seen[("resid", layer)], parts, rtol=1e-4, atol=1e-5)
            block = model.blocks()[layer]
            mlp_in = block.norm2(seen[("resid", layer)] - gate_mlp * seen[("mlp", layer)]) * (1 + scale_mlp) + shift_mlp
            torch.testing.assert_close(seen[("ff", layer)], mlp_in, rtol=1e-4, atol=1e-5)
            if layer + 1 < model.num_layers:  # TIDE's target: the next block reads norm1(resid) * (1 + scale) + shift
                mod = model.adaln_modulation(layer, t)  # [B, 2d] = scale, shift
                scale, shift = mod[:, None, :16], mod[:, None, 16:]
                norm1 = model.blocks()[layer + 1].norm1(seen[("resid", layer)]) * (1 + scale) + shift
                torch.testing.assert_close(seen[("attn1", layer + 1)], norm1, rtol=1e-4, atol=1e-5)
        mod = model.adaln_modulation(model.num_layers - 1, t)
        scale, shift = mod[:, None, :16], mod[:, None, 16:]
        h = tr.norm_out(seen[("resid", model.num_layers - 1)]) * (1 + scale) + shift
        h = tr.proj_out(h)  # [B, T, p*p*C_out]
        p, c = tr.config.patch_size, tr.config.out_channels
        g = model.token_grid
        img = h.reshape(2, g.h, g.w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(2, c, g.h * p, g.w * p)
    torch.testing.assert_close(out, img[:, :4], rtol=1e-4, atol=1e-5)


def test_the_text_padding_is_masked(pixart_dir):
    """The same prompts embedded to 12 or 20 tokens give the same noise prediction: neither the T5 encoder
    nor the cross-attention reads the padding."""
    short = ModelConfig(source=str(pixart_dir), max_prompt_tokens=12, device="cpu")
    long = short.model_copy(update={"max_prompt_tokens": 20})
    a, b = PixArt.load(short, PROMPTS), PixArt.load(long, PROMPTS)
    x, t, cond = torch.randn(4, 4, 8, 8), torch.tensor([500] * 4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(a.predict_noise(x, t, cond), b.predict_noise(x, t, cond), rtol=1e-4, atol=1e-5)
        b.masks[:, :] = 1  # unmasked padding changes it: the test can fail
        assert not torch.allclose(a.predict_noise(x, t, cond), b.predict_noise(x, t, cond), atol=1e-4)
    counts = PixArt.count_tokens(short, ["a red seven", " ".join(["seven"] * 30)])
    assert (counts[0].tokens, counts[0].truncated) == (4, False) and counts[1].truncated


def test_capture_takes_the_conditional_half_of_the_guided_batch(model):
    """Under guidance the batch is [conditional; negative prompt]; the stored half is the conditional one,
    equal to a forward pass of the conditional batch alone."""
    got = []
    spec = CaptureSpec(layers=(1,), sites=("resid", "cross"), steps=frozenset({0}), dtype="float32")
    sampler = Sampler(model, "ddim", num_steps=3, guidance_scale=4.0, seed=3)
    with ActivationCapture(model, spec, got.append) as cap:
        cap.set_samples([5, 6])
        sampler.sample([5, 6], [2, 0], observer=cap)
    step0 = got[0]
    assert step0.acts[("resid", 1)].shape == (2, 16, 16)
    x0 = torch.stack([torch.randn(model.latent_shape, generator=torch.Generator().manual_seed(sample_seed(3, i)))
                      for i in (5, 6)])  # [2, 4, 8, 8] the seeded starting latents (DDIM: sigma 1, no scaling)
    t0 = torch.full((2,), step0.timestep)
    _, seen = _forward_with_hooks(model, x0, t0, torch.tensor([2, 0]), [1])
    for site in ("resid", "cross"):
        np.testing.assert_allclose(step0.acts[(site, 1)], seen[(site, 1)].numpy(), rtol=1e-4, atol=1e-5)
