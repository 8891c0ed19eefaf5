"""The model adapters (digits and diffusers DiT families), training the default DiT, and the sampler."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tide_core.config import DigitsDiTConfig, ModelConfig
from tide_core.digits import load_digits
from tide_core.models.dit import ClassDiT
from tide_core.models.registry import ModelError, family_of
from tide_core.sampling import Sampler, sample_seed
from tide_core.train_dit import build_digits_dit, digits_scheduler_config, save_checkpoint, train_digits_dit

TINY = DigitsDiTConfig(num_layers=2, num_heads=2, head_dim=16, train_steps=6, batch_size=8, warmup_steps=2)


def test_digits_load_shapes_and_range():
    d = load_digits(16)
    assert d.images.shape == (1797, 1, 16, 16) and d.labels.shape == (1797,)
    assert d.images.min() >= -1.0 and d.images.max() <= 1.0
    assert set(np.unique(d.labels)) == set(range(10))


def test_training_is_deterministic_for_a_seed():
    data = load_digits(16)
    a = train_digits_dit(TINY, data)
    b = train_digits_dit(TINY, data)
    assert a.meta["weights_sha256"] == b.meta["weights_sha256"]
    assert a.losses == b.losses
    c = train_digits_dit(TINY.model_copy(update={"seed": 1}), data)
    assert c.meta["weights_sha256"] != a.meta["weights_sha256"]


def _model(cfg=TINY) -> ClassDiT:
    return ClassDiT(build_digits_dit(cfg).eval(), digits_scheduler_config(cfg), source="digits", fingerprint="x",
                    class_names=[str(i) for i in range(10)])


def test_a_saved_checkpoint_loads_through_the_dit_family(tmp_path):
    data = load_digits(16)
    trained = train_digits_dit(TINY, data)
    save_checkpoint(trained, tmp_path / "ckpt")
    loaded = ClassDiT.load_dir(str(tmp_path / "ckpt"))
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 500]), torch.tensor([3, 10])
    with torch.no_grad():
        ref = trained.transformer(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(loaded.predict_noise(x, t, y), ref)
    assert loaded.vae is None and loaded.null_condition == 10 and (loaded.token_grid.h, loaded.token_grid.w) == (8, 8)
    assert loaded.image_shape == (16, 16, 1) and loaded.time.num_train_timesteps == 1000


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_sample_does_not_depend_on_batching(scheduler):
    sampler = Sampler(_model(), scheduler, num_steps=4, guidance_scale=3.0, seed=5)
    ids, classes = list(range(6)), [i % 10 for i in range(6)]
    whole = sampler.sample(ids, classes).images
    parts = np.concatenate([sampler.sample(ids[i:i + 2], classes[i:i + 2]).images for i in (0, 2, 4)])
    # Same noise per sample; BLAS sums in a batch-size-dependent order, so equal up to float rounding.
    np.testing.assert_allclose(whole, parts, atol=1e-4)
    again = np.concatenate([sampler.sample(ids[i:i + 2], classes[i:i + 2]).images for i in (0, 2, 4)])
    np.testing.assert_array_equal(parts, again)  # same batches: bit-identical
    other_seed = Sampler(_model(), scheduler, num_steps=4, guidance_scale=3.0, seed=6).sample(ids, classes)
    assert not np.array_equal(whole, other_seed.images)


def test_sample_seed_is_stable():
    assert sample_seed(0, 0) == sample_seed(0, 0) != sample_seed(0, 1)
    assert sample_seed(0, 7) == 6641032415719134488  # a fixed value: seeds must not drift across versions


def tiny_hub_dit(root: Path) -> Path:
    """A tiny random DiT-XL/2-shaped checkpoint (learned sigma, 12 classes, a VAE) in the diffusers layout,
    built from configs and saved with save_pretrained: what a hub download looks like on disk."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    root = root / "tiny-dit-xl-like"
    torch.manual_seed(0)
    DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                          attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=12,
                          norm_num_groups=4).save_pretrained(root / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4).save_pretrained(root / "vae")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    return root


def test_hub_layout_with_vae_loads_through_its_family_and_samples(tmp_path):
    """The real-checkpoint path (transformer + VAE + scheduler, diffusers layout) on a tiny random model."""
    cfg = ModelConfig(source=str(tiny_hub_dit(tmp_path)))
    family = family_of(cfg)
    info = family.describe(cfg)  # from config.json alone
    assert family is ClassDiT and (info.num_layers, info.hidden_size) == (2, 16)
    model = family.load(cfg)
    assert model.vae is not None and len(model.condition_names) == 12 and model.null_condition == 12
    assert model.num_layers == 2 and model.hidden_size == 16 and model.fingerprint == family.fingerprint_of(cfg)
    assert model.image_shape == (16, 16, 3)  # the VAE upsamples the 8x8 latent by 2 per extra block
    out = Sampler(model, "ddim", num_steps=3, guidance_scale=2.0).sample([0, 1], [0, 11])
    assert out.images.shape == (2, 3, 16, 16)
    assert np.isfinite(out.images).all()


def test_unknown_and_untrained_models_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="known hub id"):
        family_of(ModelConfig(source="org/not-a-model"))
    (tmp_path / "m" / "transformer").mkdir(parents=True)
    (tmp_path / "m" / "transformer" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ModelError, match="UNet2DModel transformer; supported: DiTTransformer2DModel"):
        family_of(ModelConfig(source=str(tmp_path / "m")))
    cfg = ModelConfig(digits=TINY.model_copy(update={"checkpoint_dir": str(tmp_path / "none")}))
    with pytest.raises(ModelError, match="tide train-dit"):
        family_of(cfg).load(cfg)


def test_every_family_entry_names_its_class_and_judge():
    import importlib

    from tide_core.models.base import DiTAdapter
    from tide_core.models.registry import FAMILIES

    for entry in FAMILIES.values():
        cls = getattr(importlib.import_module(entry.module), entry.cls)
        assert issubclass(cls, DiTAdapter) and cls.family == entry.name
        assert (cls.judge_class is not None) == entry.has_judge, entry.name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_on_cuda_matches_shapes():
    m = _model()
    m.transformer.cuda()
    out = Sampler(m, "ddim", 3, 2.0).sample([0, 1], [1, 2])
    assert out.images.shape == (2, 1, 16, 16)


def test_frechet_distance_matches_the_closed_form_and_survives_dead_features():
    import warnings

    from tide_core.quality import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3)) * [1.0, 2.0, 0.5]
    b = rng.normal(size=(4000, 3)) * [3.0, 1.0, 0.5] + [1.0, 0.0, 0.0]
    # diagonal Gaussians: |mu_a - mu_b|^2 + sum (s_a - s_b)^2 with the sample moments
    sa, sb = a.std(0, ddof=1), b.std(0, ddof=1)
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + ((sa - sb) ** 2).sum()
    assert abs(frechet_distance(a, b) - want) < 0.02  # off-diagonal sample covariance is ~1e-2
    dead = np.concatenate([a, np.zeros((4000, 2))], 1)  # features that never vary: singular covariances
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert abs(frechet_distance(dead, dead)) < 1e-9
        assert np.isfinite(frechet_distance(dead, np.concatenate([b, np.zeros((4000, 2))], 1)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capture_on_cuda_copies_through_pinned_memory_and_matches_cpu():
    from tide_core.capture import ActivationCapture, CaptureSpec

    def captured(device):
        m = _model()
        m.transformer.to(device)
        got = []
        with ActivationCapture(m, CaptureSpec(layers=(0, 1), dtype="float32"), got.append) as cap:
            cap.set_samples([0, 1])
            Sampler(m, "ddim", 3, 2.0).sample([0, 1], [1, 2], observer=cap)
        return got

    cpu, gpu = captured("cpu"), captured("cuda")
    assert [c.step for c in gpu] == [c.step for c in cpu]
    for a, b in zip(cpu, gpu, strict=True):
        for key in a.acts:
            assert isinstance(b.acts[key], np.ndarray)
            np.testing.assert_allclose(b.acts[key], a.acts[key], rtol=1e-3, atol=1e-3)


def test_the_gpu_check_runs_its_code_paths_at_toy_sizes_on_the_cpu():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(repo / "bench" / "gpu_check.py"), "--tiny", "--device", "cpu"],
                         capture_output=True, text=True, timeout=600, cwd=repo)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("dit-xl:") for line in lines) and any(line.startswith("pixart-xl:") for line in lines)
    assert sum(line.startswith("sae d=") for line in lines) == 2 and lines[-1].startswith("gpu_capture_overhead=")
