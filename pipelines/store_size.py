"""How much disk a run's activation store needs, estimated from the config before anything is sampled.

Every captured (site, layer) is one array [steps, samples, tokens, channels] (docs/STORE.md), so the store
is samples x captured steps x layers x sites x tokens stored x hidden size x bytes per value. The images and
seeds beside it (one H x W x C byte image per sample) are small next to that and left out, and so is
compression (real activations compress about 1.1x: the estimate errs on the safe side).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.project import Project
from tide_core.config import (
    DIGITS_SOURCE,
    STYLED_DIGITS_SOURCE,
    TINY_FLUX_SOURCE,
    TINY_PIXART_SOURCE,
    TINY_SD3_SOURCE,
    TideConfig,
)

if TYPE_CHECKING:
    from tide_core.models.base import ModelInfo  # imports torch: the CLI starts without it

TINY_SECTIONS = {TINY_PIXART_SOURCE: "tiny_pixart", TINY_SD3_SOURCE: "tiny_sd3", TINY_FLUX_SOURCE: "tiny_flux"}
FLUX_NATIVE_SIDE = 1024  # pixels; FLUX's transformer config records no size



@dataclass(frozen=True)
class StoreEstimate:
    """The store's size and the factors it is the product of."""

    samples: int  # whose activations are stored
    steps: int
    layers: int
    sites: int
    tokens: int  # stored per image and step, after capture.token_fraction
    channels: int  # the model's hidden size
    itemsize: int  # bytes per value: 2 for float16
    done_fraction: float = 0.0  # of the shards an existing store already holds (a resumed run needs the rest)

    @property
    def total_bytes(self) -> int:
        return self.samples * self.steps * self.layers * self.sites * self.tokens * self.channels * self.itemsize

    @property
    def remaining_bytes(self) -> int:
        return round(self.total_bytes * (1.0 - self.done_fraction))

    def formula(self) -> str:
        factors = [(self.samples, "sample"), (self.steps, "step"), (self.layers, "layer"), (self.sites, "site"),
                   (self.tokens, "token"), (self.channels, "channel")]
        return " x ".join(f"{n} {word}{'' if n == 1 else 's'}" for n, word in factors) + f" x {self.itemsize} B"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def estimate_store(project: Project, info: ModelInfo) -> StoreEstimate | None:
    """The store this config writes; None when the token grid cannot be known without the model's files
    (a hub id that is not on this machine)."""
    cfg = project.config
    tokens = token_count(cfg, info)
    if tokens is None:
        return None
    c = cfg.capture
    stored = tokens if c.token_fraction >= 1.0 else max(1, round(tokens * c.token_fraction))  # capture's rule
    # sae.stream keeps the held-out shards' activations only
    samples = cfg.sampling.num_samples - cfg.first_act_shard() * cfg.sampling.shard_size
    return StoreEstimate(samples=samples, steps=len(c.steps or range(cfg.sampling.num_steps)),
                         layers=len(c.layers), sites=len(c.sites), tokens=stored, channels=info.hidden_size,
                         itemsize=2 if c.dtype == "float16" else 4, done_fraction=_done_fraction(project))


def token_count(cfg: TideConfig, info: ModelInfo) -> int | None:
    """Image tokens per sample. The exact grid is a loaded adapter's ``token_grid``, and ``describe()``
    (no weights) does not report it, so this reads what the weights' directory says: diffusers' transformer
    config gives the native grid (sample_size / patch_size on a side, in latent units; for pixel-space DiTs
    the same), scaled by area when model.height / width ask for another size (the VAE's factor from its
    config). Before a model built here exists, its config section gives the same numbers."""
    directory = Path(info.source)
    tc_path = directory / "transformer" / "config.json"
    if tc_path.is_file():
        tc = json.loads(tc_path.read_text())
        side, patch = int(tc.get("sample_size", 0)), int(tc.get("patch_size", 0) or 1)
        vae_path = directory / "vae" / "config.json"  # each VAE block but the last halves the side
        blocks = json.loads(vae_path.read_text()).get("block_out_channels", [0]) if vae_path.is_file() else [0]
        vae = 2 ** (len(blocks) - 1)
        if tc.get("_class_name") == "FluxTransformer2DModel":  # no sample_size; 2x2 latents a token
            side, patch = FLUX_NATIVE_SIDE // vae, 2
    elif cfg.model.source in (DIGITS_SOURCE, STYLED_DIGITS_SOURCE):  # pixel space
        pixel = cfg.model.digits if cfg.model.source == DIGITS_SOURCE else cfg.model.styled_digits
        side, patch, vae = pixel.image_size, pixel.patch_size, 1
    elif cfg.model.source in TINY_SECTIONS:  # tiny_pixart.py, tiny_flow.py: patches of 2, a 2x VAE
        side, patch, vae = getattr(cfg.model, TINY_SECTIONS[cfg.model.source]).sample_size, 2, 2
    else:
        return None
    if side < patch:
        return None
    native = (side // patch) ** 2
    height, width = cfg.model.height, cfg.model.width
    if height is None and width is None:
        return native
    pixels = side * vae
    return max(1, round(native * (height or pixels) * (width or pixels) / pixels**2))


def _done_fraction(project: Project) -> float:
    """The share of shards an existing store of this config already holds (0 without one)."""
    from storage import ActivationStore, StorageError

    try:
        store = ActivationStore.open(project.store_url, mode="r")
    except (StorageError, OSError):
        return 0.0
    if store.layout.num_shards != project.num_shards:  # another config's store: the run would refuse it
        return 0.0
    return len(store.done_shards()) / project.num_shards


def free_space(project: Project) -> tuple[Path, int] | None:
    """(folder, free bytes) of the disk the store goes to; None for a remote store (s3://, ...)."""
    url = project.store_url
    if "://" in url and not url.startswith("file://"):
        return None
    probe = Path(url.removeprefix("file://"))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free
