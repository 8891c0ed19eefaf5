"""The flow-matching, two-stream families: tiny random SD3 and FLUX models (built from configs and saved with
save_pretrained, the layout a hub download has) load through the SD3 and FLUX adapters; every block type's
captured image tokens are checked against a forward written out by hand, and the time convention against
the flow-matching identity x_t = (1 - sigma) x_0 + sigma noise."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pipelines.preflight import _sampling
from tide_core.capture import ActivationCapture, CaptureSpec
from tide_core.config import ModelConfig, TinyFluxConfig, TinySD3Config
from tide_core.models.flux import Flux, image_ids, pack, unpack
from tide_core.models.registry import ModelError, family_entry, family_of
from tide_core.models.sd3 import SD3
from tide_core.models.tiny_flow import build
from tide_core.prompts import Prompt, PromptSet
from tide_core.sampling import Sampler

SMALL = dict(num_layers=2, num_heads=2, head_dim=8, sample_size=8, text_layers=1, text_width=16)
PROMPTS = PromptSet((Prompt("a red seven"), Prompt("a blue two on a black background"), Prompt("a cat")))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {"sd3": build("sd3", TinySD3Config(**SMALL), root / "sd3"),
            "flux": build("flux", TinyFluxConfig(**SMALL, num_single_layers=2), root / "flux"),
            "schnell": build("flux", TinyFluxConfig(**SMALL, num_single_layers=1, guidance_embeds=False),
                             root / "schnell")}


def _load(path, **kw):
    cfg = ModelConfig(source=str(path), max_prompt_tokens=8, device="cpu", height=16, width=16, **kw)
    return family_of(cfg).load(cfg, PROMPTS, negative_prompt="")


@pytest.fixture(scope="module")
def sd3(dirs) -> SD3:
    return _load(dirs["sd3"])


@pytest.fixture(scope="module")
def flux(dirs) -> Flux:
    return _load(dirs["flux"])


def test_saved_directories_load_like_hub_downloads(dirs, sd3, flux):
    assert family_entry(ModelConfig(source=str(dirs["sd3"]))).name == "sd3"
    assert family_entry(ModelConfig(source=str(dirs["flux"]))).text
    assert (sd3.num_layers, sd3.hidden_size, flux.num_layers, flux.hidden_size) == (2, 16, 4, 16)
    assert SD3.describe(ModelConfig(source=str(dirs["sd3"]))).num_layers == 2
    assert Flux.describe(ModelConfig(source=str(dirs["flux"]))).num_layers == 4  # 2 double + 2 single
    for m in (sd3, flux):
        assert m.time.kind == "flow" and m.latent_shape == (4, 8, 8) and m.image_shape == (16, 16, 3)
        assert (m.token_grid.h, m.token_grid.w) == (4, 4) and m.null_condition == 3
    assert sd3.text.embeds.shape == (4, 77 + 8, 32) and sd3.text.pooled.shape == (4, 32)  # CLIPs joined
    assert flux.text.embeds.shape == (4, 8, 32) and flux.text.pooled.shape == (4, 16)
    assert (sd3.guidance, flux.guidance) == ("cfg", "embedded")
    assert Flux.guidance_mode(ModelConfig(source=str(dirs["schnell"]))) == "none"
    with pytest.raises(ModelError, match="set sampling.prompts"):
        SD3.load(ModelConfig(source=str(dirs["sd3"])))
    with pytest.raises(ModelError, match="lacks text_encoder_2/"):
        src = dirs["sd3"].parent / "sd3-without"
        shutil.copytree(dirs["sd3"], src, ignore=lambda d, n: ["text_encoder_2"] if d == str(dirs["sd3"]) else [])
        SD3.describe(ModelConfig(source=str(src)))


def test_sd3_runs_on_its_clip_encoders_alone(dirs, sd3):
    clip_only = _load(dirs["sd3"], use_t5=False)
    assert torch.equal(clip_only.text.embeds[:, :77], sd3.text.embeds[:, :77])  # the CLIP part is the same
    assert not clip_only.text.embeds[:, 77:].any() and sd3.text.embeds[:, 77:].any()  # T5's part: zeros


def _run_blocks_by_hand(model, x, t, cond, stream: str = "image") -> list[torch.Tensor | None]:
    """Each block's image tokens [B, T, D] (``stream="text"``: its text tokens [B, L, D]; None where a block
    returns none), from the transformer's embeddings and its blocks called one by one (a FLUX single block
    written out from its own layers), as diffusers' forward runs them."""
    pick = 0 if stream == "text" else 1
    tr = model.transformer
    text, pooled = model.text.embeds[cond], model.text.pooled[cond]
    outs = []
    if isinstance(model, SD3):
        img, temb = tr.pos_embed(x), tr.time_text_embed(t, pooled)
        txt = tr.context_embedder(text)
        for block in tr.transformer_blocks:
            txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=temb)
            outs.append((txt, img)[pick])
        return outs
    _, _, h, w = x.shape
    img = tr.x_embedder(pack(x))
    temb = tr.time_text_embed(t / 1000 * 1000, torch.full((len(x),), model.guidance_scale) * 1000, pooled)
    txt = tr.context_embedder(text)
    rotary = tr.pos_embed(torch.cat([torch.zeros(text.shape[1], 3), image_ids(h // 2, w // 2)]))
    for block in tr.transformer_blocks:
        txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rotary)
        outs.append((txt, img)[pick])
    for block in tr.single_transformer_blocks:  # norm, attention and MLP side by side, one gated projection
        both = torch.cat([txt, img], dim=1)  # [B, L + T, D]
        normed, gate = block.norm(both, emb=temb)
        mixed = torch.cat([block.attn(hidden_states=normed, image_rotary_emb=rotary),
                           block.act_mlp(block.proj_mlp(normed))], dim=2)
        both = both + gate.unsqueeze(1) * block.proj_out(mixed)
        txt, img = both[:, : text.shape[1]], both[:, text.shape[1]:]  # [B, L, D], [B, T, D]
        outs.append((txt, img)[pick])
    return outs


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_captured_image_tokens_equal_a_forward_by_hand_for_every_block_type(name, request):
    model = request.getfixturevalue(name)
    model.guidance_scale = 2.5
    torch.manual_seed(0)
    x, cond = torch.randn(2, *model.latent_shape), torch.tensor([0, 2])
    t = torch.tensor([730.0, 730.0])  # a fractional time: flow matching's timesteps are not integers
    caught = {}
    hooks = [model.site_module(i, "resid").register_forward_hook(
        lambda mod, args, out, i=i: caught.__setitem__(i, model.read_site("resid", out)))
        for i in range(model.num_layers)]
    try:
        with torch.no_grad():
            model.predict_noise(x, t, cond)
            by_hand = _run_blocks_by_hand(model, x, t, cond)
    finally:
        for h in hooks:
            h.remove()
    for i, want in enumerate(by_hand):  # SD3: joint blocks; FLUX: double blocks, then single blocks
        assert caught[i].shape == (2, model.token_grid.tokens, model.hidden_size)
        torch.testing.assert_close(caught[i], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_captured_text_tokens_equal_a_forward_by_hand_for_every_block_type(name, request):
    """resid_text: a joint / double block's text output, a single block's text part of [text; image]."""
    model = request.getfixturevalue(name)
    model.guidance_scale = 2.5
    torch.manual_seed(1)
    x, cond = torch.randn(2, *model.latent_shape), torch.tensor([1, 2])
    t = torch.tensor([415.5, 415.5])
    layers = range(model.num_layers - 1) if name == "sd3" else range(model.num_layers)  # SD3's last: no text
    caught = {}
    hooks = [model.site_module(i, "resid_text").register_forward_hook(
        lambda mod, args, out, i=i: caught.__setitem__(i, model.read_site("resid_text", out))) for i in layers]
    try:
        with torch.no_grad():
            model.predict_noise(x, t, cond)
            by_hand = _run_blocks_by_hand(model, x, t, cond, stream="text")
    finally:
        for h in hooks:
            h.remove()
    for i in layers:
        assert caught[i].shape == (2, model.text_length, model.hidden_size)
        torch.testing.assert_close(caught[i], by_hand[i], rtol=1e-5, atol=1e-5)
    if name == "sd3":
        assert by_hand[-1] is None  # context_pre_only: the last joint block returns no text stream
        with pytest.raises(ModelError, match="returns no text stream"):
            model.check_site(model.num_layers - 1, "resid_text")


def test_text_positions_come_from_the_tokenizers_that_made_the_sequence(dirs, sd3, flux):
    """SD3: CLIP's 77 positions then T5's; FLUX: T5's; padding (the attention mask) is not valid."""
    s = sd3.text_sequences(ModelConfig(source=str(dirs["sd3"]), max_prompt_tokens=8), ["a red seven"])[0]
    assert len(s.tokens) == sd3.text_length == 77 + 8
    assert [t for t, v in zip(s.tokens, s.valid, strict=True) if v] == [
        "<|startoftext|>", "a", "red", "seven", "<|endoftext|>", "a", "red", "seven", "</s>"]
    assert s.part[:77] == ["clip"] * 77 and s.part[77:] == ["t5"] * 8 and s.pieces[2] == "red</w>"
    assert sd3.text_valid[1, 77:].all()  # a long prompt fills T5's 8 positions (cut: no padding)
    assert sd3.text_valid[3].sum() == 2 + 1  # the empty negative prompt: CLIP's start and end, T5's end
    clip_only = _load(dirs["sd3"], use_t5=False)
    assert not clip_only.text_valid[:, 77:].any()  # T5's zeros hold no token
    f = flux.text_sequences(ModelConfig(source=str(dirs["flux"]), max_prompt_tokens=8), ["a blue two on a black"])
    assert f[0].tokens == ["a", "blue", "two", "on", "a", "black", "</s>", "<pad>"] and f[0].valid[-1] is False
    assert flux.text_mask([0, 2]).tolist() == flux.text_valid[[0, 2]].tolist()


def test_writing_a_site_replaces_the_image_stream_only(flux):
    x, t, cond = torch.randn(1, *flux.latent_shape), torch.tensor([500.0]), torch.tensor([1])
    with torch.no_grad():
        clean = flux.predict_noise(x, t, cond)
        hook = flux.site_module(1, "resid").register_forward_hook(
            lambda mod, args, out: flux.write_site("resid", out, flux.read_site("resid", out)))
        same = flux.predict_noise(x, t, cond)
        hook.remove()
        hook = flux.site_module(1, "resid").register_forward_hook(
            lambda mod, args, out: flux.write_site("resid", out, torch.zeros_like(flux.read_site("resid", out))))
        zeroed = flux.predict_noise(x, t, cond)
        hook.remove()
    assert torch.equal(clean, same) and not torch.allclose(clean, zeroed)


def test_packing_follows_the_token_grid():
    latents = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)  # [B, C, H, W]
    tokens = pack(latents)  # [B, (H/2)(W/2), 4C]
    assert tokens.shape == (2, 6, 12) and torch.equal(unpack(tokens, 4, 6), latents)
    row, col = 1, 2  # token 1 * 3 + 2 holds the 2x2 patch at latent rows 2-3, cols 4-5
    assert torch.equal(tokens[0, row * 3 + col].view(3, 2, 2), latents[0, :, 2:4, 4:6])
    assert image_ids(2, 3)[row * 3 + col].tolist() == [0.0, row, col]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_time_is_sigma_and_the_exact_velocity_lands_on_the_data(name, request):
    model = request.getfixturevalue(name)
    sampler = Sampler(model, "euler", 6, guidance_scale=1.0)
    sigmas, timesteps = sampler.sigmas(), sampler.timesteps()
    assert sigmas[0] == 1.0 and all(a > b for a, b in zip(sigmas, sigmas[1:], strict=False))
    assert timesteps.tolist() == [round(1000 * s) for s in sigmas] and timesteps[0] == 1000
    assert sampler.provenance()["sigmas"] == sigmas
    x0, noise = torch.randn(2, *model.latent_shape), torch.randn(2, *model.latent_shape)
    xt, target = model.training_pair(x0, noise, torch.tensor([250, 250]))
    torch.testing.assert_close(xt, 0.75 * x0 + 0.25 * noise)
    sched, x = model.make_scheduler("euler", 6), noise.clone()
    for t in sched.timesteps:  # a model that predicts the training target exactly walks noise to x0
        x = sched.step(model.training_pair(x0, noise, torch.tensor([0, 0]))[1], t, x).prev_sample
    torch.testing.assert_close(x, x0, rtol=1e-4, atol=1e-4)
    enc = model.encode(model.decode(x0))  # decode/encode undo the VAE's scaling and shift
    assert enc.shape == x0.shape


def test_guidance_follows_the_model(sd3, flux, dirs):
    seen = []

    class Observer:
        def begin_step(self, step, timestep, batch, guided):
            seen.append((step, timestep, guided))

        def end_step(self, step):
            pass

    Sampler(sd3, "euler", 2, guidance_scale=3.0).sample([0], [1], observer=Observer())
    Sampler(flux, "euler", 2, guidance_scale=3.0).sample([0], [1], observer=Observer())
    assert [g for _, _, g in seen] == [True, True, False, False]  # SD3: CFG; FLUX-dev: one pass, scale embedded
    assert all(isinstance(t, int) for _, t, _ in seen)
    a = Sampler(flux, "euler", 2, guidance_scale=1.5).sample([0], [1]).images
    b = Sampler(flux, "euler", 2, guidance_scale=4.0).sample([0], [1]).images
    assert not np.array_equal(a, b)  # the embedded scale reaches the model
    schnell = _load(dirs["schnell"])
    with pytest.raises(ModelError, match="takes no guidance"):
        Sampler(schnell, "euler", 2, guidance_scale=3.0)
    with pytest.raises(ModelError, match="set sampling.scheduler = 'euler'"):
        sd3.make_scheduler("ddim", 4)


def test_capture_stores_the_image_tokens_with_integer_timesteps(sd3):
    got = []
    spec = CaptureSpec(layers=(0, 1), sites=("resid",))
    sampler = Sampler(sd3, "euler", 3, guidance_scale=2.0)
    with ActivationCapture(sd3, spec, got.append) as cap:
        cap.set_samples([0, 1])
        sampler.sample([0, 1], [0, 1], observer=cap)
    assert [c.step for c in got] == [0, 1, 2]
    assert [c.timestep for c in got] == sampler.timesteps().tolist()
    assert got[0].acts[("resid", 1)].shape == (2, 16, 16)  # the conditional half: 2 images, 16 tokens, d=16


def test_preflight_names_a_scheduler_or_guidance_the_family_does_not_take(dirs):
    from tide_core.config import TideConfig

    def problems(source, **sampling):
        cfg = TideConfig.model_validate({"model": {"source": str(source)}, "sampling": sampling})
        return _sampling(family_of(cfg.model), cfg)

    assert problems(dirs["sd3"], scheduler="euler") == []
    assert "set sampling.scheduler to one of them" in problems(dirs["sd3"], scheduler="ddim")[0]
    assert "takes no guidance" in problems(dirs["schnell"], scheduler="euler", guidance_scale=3.0)[0]
    assert problems(dirs["schnell"], scheduler="euler", guidance_scale=1.0) == []


@pytest.mark.slow
def test_a_flux_run_end_to_end_labels_its_steps_with_sigma(tmp_path):
    """tide run on a tiny random FLUX: a double- and a single-stream layer captured in both streams, SAEs trained
    on continuous time (the text ones on non-padding positions), the steps table giving each step's sigma, and
    the text SAEs' statistics queryable by token string."""
    from pipelines.definitions import definitions_for
    from pipelines.instance import warehouse_instance
    from pipelines.project import Project
    from pipelines.runner import materialize
    from storage import Warehouse
    from tests.conftest import write_config

    (tmp_path / "prompts.txt").write_text("a red seven\na blue two on a black background\na cat\n")
    cfg = {"model": {"source": "tiny-flux", "max_prompt_tokens": 8,
                     "tiny_flux": {**SMALL, "num_single_layers": 1, "checkpoint_dir": str(tmp_path / "tf")}},
           "sampling": {"prompts": str(tmp_path / "prompts.txt"), "scheduler": "euler", "num_steps": 4,
                        "guidance_scale": 3.5, "num_samples": 12, "shard_size": 6},
           "capture": {"layers": [1, 2], "sites": ["resid", "resid_text"]},
           "sae": {"variants": ["tide", "topk"], "spec": {"n_latents": 32, "k": 4}},
           "edit": {"feature_ids": [0], "n_samples": 2}}
    project = Project.load(write_config(tmp_path / "run", cfg))
    report = materialize(definitions_for(project), warehouse_instance(project), log=lambda m: None)
    assert report.success
    wh = Warehouse(project.duckdb_path)
    steps = wh.query("SELECT step, timestep, model_time, time_kind FROM steps ORDER BY step").to_pylist()
    assert [s["time_kind"] for s in steps] == ["flow"] * 4 and steps[0]["model_time"] == 1.0
    assert all(s["timestep"] == round(1000 * s["model_time"]) for s in steps)
    saes = wh.query("SELECT layer, site, count(*) AS n FROM saes GROUP BY ALL ORDER BY ALL").to_pylist()
    assert saes == [{"layer": layer, "site": site, "n": 2} for layer in (1, 2)  # a double- and a single-stream block
                    for site in ("resid", "resid_text")]
    # the text SAEs read the valid positions only: 12 images x 4 steps x their prompts' tokens, no padding
    from storage import ActivationStore
    store = ActivationStore.open(project.store_url, mode="r")
    valid = store.token_mask("resid_text", 0, 12)
    assert 0 < valid.sum() < valid.size
    held = wh.query("SELECT max(tokens) AS t FROM features f JOIN saes s USING (sae_id) WHERE s.site = 'resid_text'")
    assert held.to_pylist()[0]["t"] == 4 * valid.sum()  # the feature pass: every valid position, every step
    words = wh.query("SELECT token, sum(fires) AS fires FROM v_feature_tokens WHERE site = 'resid_text' AND layer = 1 "
                     "AND token IN ('red', 'cat') GROUP BY token ORDER BY token").to_pylist()
    assert [w["token"] for w in words] == ["cat", "red"] and all(w["fires"] > 0 for w in words)
    rates = wh.query("SELECT min(fire_rate) AS lo, max(fire_rate) AS hi FROM v_feature_tokens").to_pylist()[0]
    assert 0 < rates["lo"] <= rates["hi"] <= 1
    assert wh.query("SELECT count(*) AS n FROM feature_tokens WHERE token = '<pad>'").to_pylist()[0]["n"] == 0
    labelled = wh.query("SELECT count(*) AS n FROM v_sae_metrics WHERE step >= 0 AND model_time IS NULL")
    assert labelled.to_pylist()[0]["n"] == 0
    assert (project.root / "dashboard" / "index.html").is_file()
