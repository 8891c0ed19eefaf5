"""Styled digits: scikit-learn's real handwritten digits rendered with known style factors, and captions.

Every image is a real digit (the ``class`` factor) drawn in one of six stroke colours, with a thin,
regular or bold stroke (the digit's skeleton redrawn at a fixed width per thickness), on a black, white or grey
background. Every factor of every image is known by construction, so a model trained on them can be
judged factor by factor, and a feature's association with each factor measured against ground truth.

* ``stroke_masks``: each digit's stroke coverage (alpha) at every thickness, rendered once.
* ``render``: images [N, 3, S, S] in [-1, 1] from masks and factor values (vectorised; cheap enough to
  draw new styles for every training batch).
* ``caption`` / ``parse_caption``: "a bold red seven on a white background"; any style factor may be left
  out ("a red seven"), and parsing names the words it does not know.

Deterministic: the same digits, factor values and seeds give the same bits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from tide_core.digits import DigitsData, resize_bilinear


@dataclass(frozen=True)
class Factor:
    """One generative factor and its values, in index order (a value's index is its code)."""

    name: str
    values: tuple[str, ...]


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS: dict[str, tuple[float, float, float]] = {  # stroke RGB in [0, 1]
    "red": (0.9, 0.1, 0.1), "orange": (1.0, 0.55, 0.0), "yellow": (0.95, 0.9, 0.1),
    "green": (0.1, 0.7, 0.2), "blue": (0.15, 0.3, 0.95), "purple": (0.6, 0.15, 0.8),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0),
                                                      "grey": (0.5, 0.5, 0.5)}
THICKNESS = ("thin", "regular", "bold")
FACTORS: tuple[Factor, ...] = (
    Factor("class", DIGIT_WORDS),
    Factor("colour", tuple(COLOURS)),
    Factor("thickness", THICKNESS),
    Factor("background", tuple(BACKGROUNDS)),
)
FACTOR_NAMES = tuple(f.name for f in FACTORS)
STYLE_FACTORS = FACTOR_NAMES[1:]

# The digits are drawn at RENDER_SCALE x the output size, shaped there, then averaged down (anti-aliased).
RENDER_SCALE = 4
# Stroke width in output pixels per thickness. The stroke is redrawn around the digit's skeleton at this
# width, so a thickness is the same number of pixels on every digit (sklearn's own strokes vary from ~2 to
# ~6 pixels at 32 x 32, as much as the steps between thicknesses: thinning or thickening the digit as it is
# would leave "thin" and "bold" overlapping, and no judge could tell them apart).
STROKE_WIDTH = {"thin": 1.5, "regular": 3.0, "bold": 5.0}
# Grey level of the upsampled digit above which a pixel is ink (before skeletonising).
INK_THRESHOLD = 0.35


def stroke_masks(digits: DigitsData, size: int = 32) -> np.ndarray:
    """Stroke coverage in [0, 1] of every digit at every thickness: float32 [N, len(THICKNESS), size, size].

    ``digits`` at their native 8 x 8 (``load_digits(8)``); each is upsampled bilinearly to RENDER_SCALE x
    ``size``, thresholded, reduced to its one-pixel skeleton (scikit-image), redrawn as a disc-brushed line
    of each thickness's width (a distance transform), and averaged down.
    """
    from scipy import ndimage
    from skimage.morphology import skeletonize

    if digits.images.shape[-1] != 8:
        raise ValueError(f"stroke_masks takes the native 8 x 8 digits (load_digits(8)); got {digits.images.shape}")
    big = size * RENDER_SCALE
    grey = resize_bilinear((digits.images[:, 0] + 1.0) / 2.0, big)  # [N, big, big] in [0, 1]
    out = np.empty((len(digits), len(THICKNESS), size, size), np.float32)
    for i in range(len(grey)):
        dist = ndimage.distance_transform_edt(~skeletonize(grey[i] > INK_THRESHOLD))  # [big, big] to the skeleton
        for j, name in enumerate(THICKNESS):
            # coverage of a brush of radius width/2 (+0.5: a pixel is covered up to its far edge)
            alpha = np.clip(STROKE_WIDTH[name] * RENDER_SCALE / 2 + 0.5 - dist, 0.0, 1.0)
            out[i, j] = alpha.reshape(size, RENDER_SCALE, size, RENDER_SCALE).mean((1, 3))
    return out


def render(masks: np.ndarray, digit: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Images float32 [B, 3, S, S] in [-1, 1]: digit[b]'s stroke (masks [N, T, S, S]) at factors[b] =
    (class, colour, thickness, background) value codes. The class code is the digit's own label; it is
    not used to draw (the digit is)."""
    colours = np.array(list(COLOURS.values()), np.float32)  # [C, 3]
    backgrounds = np.array(list(BACKGROUNDS.values()), np.float32)  # [G, 3]
    alpha = masks[digit, factors[:, 2]][:, None]  # [B, 1, S, S]
    ink = colours[factors[:, 1]][:, :, None, None]  # [B, 3, 1, 1]
    paper = backgrounds[factors[:, 3]][:, :, None, None]  # [B, 3, 1, 1]
    return (paper + alpha * (ink - paper)) * 2.0 - 1.0  # [B, 3, S, S]


def draw_styles(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Factor codes int64 [B, 4] for digits with these labels: the class, and uniform style values."""
    styles = [rng.integers(len(FACTORS[i].values), size=len(labels)) for i in range(1, len(FACTORS))]
    return np.stack([labels.astype(np.int64), *styles], axis=1)


def caption(codes: np.ndarray, keep: np.ndarray | None = None) -> str:
    """The caption of one image's factor codes [4]; ``keep`` [4] bool says which style factors to name
    (the class is always named). "a bold red seven on a white background"."""
    keep = np.ones(len(FACTORS), bool) if keep is None else keep
    words = ["a"]
    if keep[2]:
        words.append(THICKNESS[codes[2]])
    if keep[1]:
        words.append(FACTORS[1].values[codes[1]])
    words.append(DIGIT_WORDS[codes[0]])
    if keep[3]:
        words += ["on", "a", FACTORS[3].values[codes[3]], "background"]
    return " ".join(words)


def captions(codes: np.ndarray, rng: np.random.Generator, drop: float) -> list[str]:
    """Captions of factor codes [B, 4], each style factor left out with probability ``drop``."""
    keep = rng.random(codes.shape) >= drop  # [B, 4]
    return [caption(c, k) for c, k in zip(codes, keep, strict=True)]


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption says about each factor (None: not named), and the words that name no factor value."""

    values: dict[str, str | None]
    unknown: tuple[str, ...]


# Words that carry no factor value in the templates.
_GLUE = {"a", "an", "on", "background", "digit", "the", "with", "stroke", "in"}


def parse_caption(text: str) -> ParsedCaption:
    """The factor values a caption names. Two values of one factor, or a word that is no value of any
    factor, go to ``unknown``: such a prompt is still valid, but the judge cannot score it on that factor."""
    values: dict[str, str | None] = dict.fromkeys(FACTOR_NAMES)
    unknown = []
    lookup = {v: f.name for f in FACTORS for v in f.values} | {"gray": "background"}
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _GLUE:
            continue
        factor = lookup.get(word)
        value = "grey" if word == "gray" else word
        if factor is None or (values[factor] is not None and values[factor] != value):
            unknown.append(word)
        else:
            values[factor] = value
    return ParsedCaption(values=values, unknown=tuple(unknown))


def factor_grid() -> np.ndarray:
    """Every combination of factor values once: codes int64 [10 * 6 * 3 * 3, 4] (540), class slowest."""
    axes = np.meshgrid(*[np.arange(len(f.values)) for f in FACTORS], indexing="ij")
    return np.stack([a.reshape(-1) for a in axes], axis=1).astype(np.int64)
