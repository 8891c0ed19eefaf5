"""Styled digits (tide_core/styled_digits.py): renders carry exactly the factors recorded for them, captions
say them and parse back, and the factor judge's pieces fit together."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tide_core.digits import DigitsData, load_digits, split, split_indices
from tide_core.styled_digits import (
    BACKGROUNDS,
    COLOURS,
    FACTORS,
    caption,
    captions,
    draw_styles,
    factor_grid,
    parse_caption,
    render,
    stroke_masks,
)


@pytest.fixture(scope="module")
def digits() -> DigitsData:
    d = load_digits(8)
    rows = np.arange(0, len(d), 45)  # 40 digits, every class
    return DigitsData(d.images[rows], d.labels[rows])


@pytest.fixture(scope="module")
def masks(digits) -> np.ndarray:
    return stroke_masks(digits, 32)


def test_masks_are_deterministic_and_thickness_orders_the_ink(digits, masks):
    assert masks.shape == (len(digits), 3, 32, 32) and masks.dtype == np.float32
    assert 0 <= masks.min() and masks.max() <= 1
    np.testing.assert_array_equal(stroke_masks(digits, 32), masks)
    ink = masks.sum((2, 3))  # [N, 3]
    assert (ink[:, 0] < ink[:, 1]).all() and (ink[:, 1] < ink[:, 2]).all()
    assert ink[:, 0].min() > 40  # a thin stroke is still a digit, never erased


def test_a_render_is_its_background_off_the_stroke_and_its_colour_on_it(digits, masks):
    rng = np.random.default_rng(0)
    codes = draw_styles(digits.labels, rng)
    img = (render(masks, np.arange(len(digits)), codes) + 1) / 2  # [N, 3, S, S] in [0, 1]
    colours, papers = list(COLOURS.values()), list(BACKGROUNDS.values())
    for i in range(len(digits)):
        alpha = masks[i, codes[i, 2]]
        np.testing.assert_allclose(img[i][:, alpha == 0].T, np.broadcast_to(papers[codes[i, 3]], ((alpha == 0).sum(), 3)),
                                   atol=1e-6)
        np.testing.assert_allclose(img[i][:, alpha == 1].T, np.broadcast_to(colours[codes[i, 1]], ((alpha == 1).sum(), 3)),
                                   atol=1e-6)
    assert (codes[:, 0] == digits.labels).all()
    np.testing.assert_array_equal(draw_styles(digits.labels, np.random.default_rng(0)), codes)


def test_every_caption_of_the_grid_parses_back_to_its_factors():
    grid = factor_grid()
    assert len(grid) == 10 * 6 * 3 * 3 and len(np.unique(grid, axis=0)) == len(grid)
    for codes in grid[::7]:
        parsed = parse_caption(caption(codes))
        assert parsed.unknown == ()
        assert [parsed.values[f.name] for f in FACTORS] == [f.values[c] for f, c in zip(FACTORS, codes, strict=True)]
    assert caption(np.array([7, 0, 2, 1])) == "a bold red seven on a white background"
    assert caption(np.array([7, 0, 2, 1]), np.array([True, True, False, False])) == "a red seven"


def test_captions_leave_style_factors_out_at_the_given_rate():
    codes = factor_grid()
    said = [parse_caption(c).values for c in captions(codes, np.random.default_rng(1), drop=0.25)]
    assert all(v["class"] is not None for v in said)  # the class is always named
    for name in ("colour", "thickness", "background"):
        left_out = np.mean([v[name] is None for v in said])
        assert 0.18 < left_out < 0.32


def test_unknown_words_and_conflicting_values_are_reported():
    p = parse_caption("a shiny red seven on a gray background, an eight")
    assert p.values["class"] == "seven" and p.values["background"] == "grey"
    assert p.unknown == ("shiny", "eight")


def test_split_indices_match_the_split(digits):
    d = load_digits(8)
    train_rows, test_rows = split_indices(d.labels, 0.25, 0)
    train, test = split(d, 0.25, 0)
    np.testing.assert_array_equal(d.labels[test_rows], test.labels)
    np.testing.assert_array_equal(d.images[train_rows], train.images)
    assert not set(train_rows) & set(test_rows) and len(train_rows) + len(test_rows) == len(d)


def test_factor_judge_heads_and_judgement(masks, digits):
    from tide_core.factor_judge import FactorJudge, fixed_renders, judge_factors

    torch.manual_seed(0)
    judge = FactorJudge().eval()
    r = fixed_renders(masks, np.arange(len(digits)), digits.labels, 2, seed=3)
    v = judge_factors(judge, r.images, batch_size=32)
    assert v.pred.shape == (2 * len(digits), 4) and v.features.shape == (2 * len(digits), 128)
    for j, f in enumerate(FACTORS):
        assert v.pred[:, j].max() < len(f.values)


def test_the_styled_digits_pixart_trains_and_loads_in_pixel_space(tmp_path):
    """A few steps of the trainer at toy size: the directory has no vae/, the PixArt adapter loads it as a
    pixel-space model, samples RGB images from captions, and training is deterministic for a seed."""
    import json

    from tide_core.config import ModelConfig
    from tide_core.config.model import StyledDigitsConfig
    from tide_core.models.pixart import PixArt
    from tide_core.prompts import Prompt, PromptSet
    from tide_core.sampling import Sampler
    from tide_core.train_styled import train_and_save

    cfg = StyledDigitsConfig(image_size=8, patch_size=2, num_layers=2, num_heads=2, head_dim=8, text_width=16,
                             text_layers=1, train_steps=3, batch_size=4, warmup_steps=1)
    first = train_and_save(cfg, tmp_path / "a")
    second = train_and_save(cfg, tmp_path / "b")
    assert first.meta["weights_sha256"] == second.meta["weights_sha256"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tide_model.json", "tokenizer", "transformer"]
    assert json.loads((tmp_path / "a" / "tide_model.json").read_text())["factors"]["thickness"] == [
        "thin", "regular", "bold"]
    model = PixArt.load(ModelConfig(source=str(tmp_path / "a"), max_prompt_tokens=12, device="cpu"),
                        PromptSet((Prompt("a bold red seven"), Prompt("a two on a white background"))))
    assert model.vae is None and model.latent_shape == (3, 8, 8) and model.image_shape == (8, 8, 3)
    assert (model.token_grid.h, model.token_grid.w) == (4, 4)
    batch = Sampler(model, "ddim", num_steps=2, guidance_scale=2.0, seed=0).sample([0, 1], [0, 1])
    images = np.asarray(batch.images)
    assert images.shape[0] == 2 and np.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
