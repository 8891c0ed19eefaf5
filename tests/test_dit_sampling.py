import numpy as np
import pytest
import torch

from tide_core.config import DigitsDiTConfig
from tide_core.digits import load_digits
from tide_core.dit import DiTBundle, build_digits_dit, digits_scheduler_config, load_bundle, save_bundle
from tide_core.sampling import Sampler, sample_seed
from tide_core.train_dit import train_digits_dit

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
    assert a.bundle.meta["weights_sha256"] == b.bundle.meta["weights_sha256"]
    assert a.losses == b.losses
    c = train_digits_dit(TINY.model_copy(update={"seed": 1}), data)
    assert c.bundle.meta["weights_sha256"] != a.bundle.meta["weights_sha256"]


def _bundle(cfg=TINY) -> DiTBundle:
    return DiTBundle(transformer=build_digits_dit(cfg).eval(), vae=None,
                     scheduler_config=digits_scheduler_config(cfg), num_classes=10,
                     class_names=[str(i) for i in range(10)], source="digits", config_hash="x")


def test_save_load_roundtrip(tmp_path):
    b = _bundle()
    save_bundle(b, tmp_path / "ckpt")
    loaded = load_bundle(tmp_path / "ckpt")
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([10, 500])
    y = torch.tensor([3, 10])
    with torch.no_grad():
        ref = b.transformer(x, timestep=t, class_labels=y).sample
        out = loaded.transformer(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(ref, out)
    assert loaded.vae is None and loaded.num_classes == 10 and loaded.token_grid == (8, 8)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_sample_does_not_depend_on_batching(scheduler):
    sampler = Sampler(_bundle(), scheduler, num_steps=4, guidance_scale=3.0, seed=5)
    ids, classes = list(range(6)), [i % 10 for i in range(6)]
    whole = sampler.sample(ids, classes).images
    parts = np.concatenate([sampler.sample(ids[i:i + 2], classes[i:i + 2]).images for i in (0, 2, 4)])
    # Same noise per sample; BLAS sums in a batch-size-dependent order, so equal up to float rounding.
    np.testing.assert_allclose(whole, parts, atol=1e-4)
    again = np.concatenate([sampler.sample(ids[i:i + 2], classes[i:i + 2]).images for i in (0, 2, 4)])
    np.testing.assert_array_equal(parts, again)  # same batches: bit-identical
    other_seed = Sampler(_bundle(), scheduler, num_steps=4, guidance_scale=3.0, seed=6).sample(ids, classes)
    assert not np.array_equal(whole, other_seed.images)


def test_sample_seed_is_stable():
    assert sample_seed(0, 0) == sample_seed(0, 0) != sample_seed(0, 1)
    assert sample_seed(0, 7) == 6641032415719134488  # a fixed value: seeds must not drift across versions


def test_hub_layout_with_vae_loads_and_samples(tmp_path):
    """The real-checkpoint path (transformer + VAE + scheduler, diffusers layout) on a tiny random model."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    root = tmp_path / "tiny-dit-xl-like"
    DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                          attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=12,
                          norm_num_groups=4).save_pretrained(root / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4).save_pretrained(root / "vae")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    bundle = load_bundle(root)
    assert bundle.vae is not None and bundle.learn_sigma and bundle.num_classes == 12
    assert bundle.num_layers == 2 and bundle.hidden_size == 16
    out = Sampler(bundle, "ddim", num_steps=3, guidance_scale=2.0).sample([0, 1], [0, 11])
    assert out.images.shape == (2, 3, 16, 16)  # VAE upsamples the 8x8 latent by 2 per extra block
    assert np.isfinite(out.images).all()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from tide_core.config import ModelConfig
    from tide_core.dit import load_model

    cfg = ModelConfig(digits=TINY.model_copy(update={"checkpoint_dir": str(tmp_path / "none")}))
    with pytest.raises(FileNotFoundError, match="tide train-dit"):
        load_model(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_on_cuda_matches_shapes():
    b = _bundle()
    b.transformer.cuda()
    out = Sampler(b, "ddim", 3, 2.0).sample([0, 1], [1, 2])
    assert out.images.shape == (2, 1, 16, 16)


def test_frechet_distance_matches_the_closed_form_and_survives_dead_features():
    import warnings

    from tide_core.judge import frechet_distance

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
