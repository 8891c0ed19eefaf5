"""Sampling with classifier-free guidance, in a loop the project owns, for any model family.

The model side (conditioning, the denoiser call, schedulers, decoding) is the family's adapter
(``tide_core.models``); this loop is where capture and interventions hook in (through ``StepObserver``).
A condition is an index per image (a class id; a prompt id for text-conditional families); guidance
contrasts it with the adapter's ``null_condition``.

Determinism: a sample's initial noise (and, for DDPM, its per-step noise) comes from a generator
seeded by (run seed, sample_id) alone, so images and activations never depend on batch or shard size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from tide_core.models.base import DiTAdapter
from tide_core.models.registry import ModelError


class StepObserver(Protocol):
    """Told where the sampler is, so forward hooks know which step and which batch half they see."""

    def begin_step(self, step: int, timestep: int, batch: int, guided: bool) -> None: ...

    def end_step(self, step: int) -> None: ...


@dataclass(frozen=True)
class SampleBatch:
    """Final images of a batch of samples."""

    images: np.ndarray  # float32 [B, C, H, W] in [-1, 1] (pixel space, after the VAE if any)
    conditions: np.ndarray  # int64 [B] condition index of each image (class id)
    seeds: np.ndarray  # int64 [B]


def sample_seed(run_seed: int, sample_id: int) -> int:
    """The noise seed of one sample: a hash of (run seed, sample_id), stable across machines."""
    digest = hashlib.blake2b(f"{run_seed}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def spread_steps(steps: Sequence[int], count: int) -> list[int]:
    """``count`` of ``steps``, evenly spaced from the first to the last (all of them if there are fewer)."""
    if count >= len(steps):
        return [int(s) for s in steps]
    picks = np.unique(np.round(np.linspace(0, len(steps) - 1, count)).astype(int))
    return [int(steps[i]) for i in picks]


def condition_for(sample_id: int, conditions: Sequence[int]) -> int:
    """Conditions (classes) are assigned round-robin by sample_id, so every shard is balanced."""
    return int(conditions[sample_id % len(conditions)])


class Sampler:
    """Runs the denoising loop of a model for given sample ids."""

    def __init__(self, model: DiTAdapter, scheduler: str = "ddim", num_steps: int = 50,
                 guidance_scale: float = 4.0, seed: int = 0, cfg_renorm: float | None = None):
        if model.guidance == "none" and guidance_scale != 1.0:
            raise ModelError(f"sampling.guidance_scale={guidance_scale}: the model takes no guidance (e.g. "
                             "FLUX-schnell); set sampling.guidance_scale = 1")
        model.guidance_scale = guidance_scale  # an "embedded" guidance mode reads it as a model input
        self.model = model
        self.scheduler_name = scheduler
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.cfg_renorm = cfg_renorm  # None: off; else cap |guided eps| at cfg_renorm * |cond eps| per image

    @property
    def guided(self) -> bool:
        """Classifier-free guidance: two forward passes a step (not for a model that embeds the scale)."""
        return self.guidance_scale != 1.0 and self.model.guidance == "cfg"

    def timesteps(self) -> np.ndarray:
        """The stored integer timestep of each step (step 0 = noisiest)."""
        sched = self.model.make_scheduler(self.scheduler_name, self.num_steps)
        return np.array([self.model.time.label(t) for t in sched.timesteps.cpu()], np.int64)

    def sigmas(self) -> list[float]:
        """Flow matching: the model's own time value (sigma) of each step, exactly."""
        sched = self.model.make_scheduler(self.scheduler_name, self.num_steps)
        return [float(s) for s in sched.sigmas[: self.num_steps].cpu()]

    def provenance(self) -> dict:
        return {
            "scheduler": self.scheduler_name,
            # diffusers' private keys (e.g. _use_default_values, a set's order) are not part of the schedule
            "scheduler_config": {k: v for k, v in self.model.make_scheduler(self.scheduler_name, self.num_steps)
                                 .config.items() if not k.startswith("_")},
            "num_steps": self.num_steps,
            "timesteps": self.timesteps().tolist(),
            **({"sigmas": self.sigmas()} if self.model.time.kind == "flow" else {}),
            "guidance_scale": self.guidance_scale,
            "seed": self.seed,
            "seed_rule": "blake2b('{seed}:{sample_id}') -> torch.Generator per sample",
            **({"cfg_renorm": self.cfg_renorm} if self.cfg_renorm is not None else {}),
        }

    @torch.no_grad()
    def sample(self, sample_ids: Sequence[int], conditions: Sequence[int],
               observer: StepObserver | None = None) -> SampleBatch:
        m = self.model
        dev = m.device
        seeds = [sample_seed(self.seed, int(i)) for i in sample_ids]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        x = torch.stack([torch.randn(m.latent_shape, generator=g) for g in gens]).to(dev, torch.float32)  # [B,C,h,w]
        cond = torch.as_tensor(list(conditions), device=dev, dtype=torch.long)  # [B]
        sched = m.make_scheduler(self.scheduler_name, self.num_steps)
        x = x * getattr(sched, "init_noise_sigma", 1.0)  # flow matching starts from unit noise
        n = len(sample_ids)
        both = torch.cat([cond, torch.full_like(cond, m.null_condition)]) if self.guided else cond  # [2B or B]
        for step, t in enumerate(sched.timesteps):
            if observer is not None:
                observer.begin_step(step, m.time.label(t), n, self.guided)
            model_in = torch.cat([x, x]) if self.guided else x  # [2B or B, C, h, w]
            if hasattr(sched, "scale_model_input"):  # DDPM-family schedulers; flow matching has none
                model_in = sched.scale_model_input(model_in, t)
            tt = m.time.model_time(torch.full((model_in.shape[0],), float(t), device=dev))  # [2B or B]
            eps = m.predict_noise(model_in, tt, both)  # [2B or B, C, h, w]
            if self.guided:
                c, u = eps.chunk(2)
                eps = u + self.guidance_scale * (c - u)  # guidance on every channel
                if self.cfg_renorm is not None:
                    eps = renorm_guided(eps, c, self.cfg_renorm)
            if observer is not None:
                observer.end_step(step)
            if self.scheduler_name == "ddpm":
                # diffusers' randn_tensor draws sample i from generator i: per-sample noise.
                x = sched.step(eps, t, x, generator=gens).prev_sample
            elif self.scheduler_name == "ddim":
                # Re-derive eps from the clipped x0 estimate: with guidance the raw eps overshoots, and a
                # clipped x0 paired with the unclipped eps drives DDIM to saturated images.
                x = sched.step(eps, t, x, use_clipped_model_output=True).prev_sample
            else:  # dpm, euler (flow matching): deterministic, no noise to draw
                x = sched.step(eps, t, x).prev_sample
        images = m.decode(x).cpu().numpy()
        return SampleBatch(images=images, conditions=np.asarray(conditions, np.int64),
                           seeds=np.asarray(seeds, np.int64))


def renorm_guided(guided: torch.Tensor, cond: torch.Tensor, cap: float) -> torch.Tensor:
    """CFG renorm: scale each image's guided prediction [B, C, h, w] down so its norm is at most cap times
    the conditional prediction's; an edit that inflates the guided eps then cannot blow up the image."""
    g = guided.flatten(1).norm(dim=1).clamp_min(1e-12)  # [B]
    limit = cap * cond.flatten(1).norm(dim=1)  # [B]
    return guided * (limit / g).clamp(max=1.0)[:, None, None, None]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] float [N, C, H, W] -> uint8 [N, H, W, C] for storage and display."""
    x = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.transpose(x, (0, 2, 3, 1))


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [-1, 1] (the inverse of to_uint8, up to rounding)."""
    return np.transpose(images, (0, 3, 1, 2)).astype(np.float32) / 127.5 - 1.0
