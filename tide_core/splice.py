"""Splicing an SAE into a DiT block: a site's output (default the block output) is replaced by the SAE's
reconstruction.

Used for the spliced evaluation (sample with x -> x_hat at every step and compare the images with the
unspliced ones of the same seeds; noise the same images and compare the denoiser's loss). A
``StepObserver``: the sampler tells it the current timestep, which the TIDE variant conditions on. Both CFG
halves are spliced (the block output the model sees is replaced). ``ablate`` replaces the output by what the
SAE reconstructs from no latents at all (its decoder bias): the baseline that loss recovery is measured from.
"""

from __future__ import annotations

import torch

from tide_core.capture import BlockHook
from tide_core.models.base import DiTAdapter


class SAESplice(BlockHook):
    """Forward hook on ``site`` of block ``layer`` returning the SAE reconstruction of its output (or, with
    ``ablate``, the SAE's reconstruction of zero latents)."""

    def __init__(self, model: DiTAdapter, layer: int, sae, steps: set[int] | None = None, ablate: bool = False,
                 site: str = "resid"):
        self.model, self.layer, self.sae, self.steps, self.ablate = model, layer, sae, steps, ablate
        self.site = site
        self._timestep = 0
        self._active = False

    def begin_step(self, step: int, timestep: int, batch: int, guided: bool) -> None:
        self.set_timestep(timestep)
        self._active = self.steps is None or step in self.steps

    def end_step(self, step: int) -> None:
        self._active = False

    def set_timestep(self, timestep: int) -> None:
        """For calls outside the sampler (a single denoiser call at a chosen timestep)."""
        self._timestep, self._active = timestep, True

    def _edit(self, tokens: torch.Tensor) -> torch.Tensor | None:
        if not self._active:
            return None
        b, n, d = tokens.shape  # [B', T, D]
        x = tokens.reshape(b * n, d).float()
        with torch.no_grad():
            if self.ablate:
                x_hat = self.sae.decode(x.new_zeros(1, self.sae.spec.n_latents)).expand(b * n, d)  # [B'*T, D]
            else:
                t = torch.full((b * n,), self._timestep, dtype=torch.long, device=x.device)
                x_hat = self.sae(x, t).x_hat  # [B'*T, D]
        return x_hat.reshape(b, n, d).to(tokens.dtype)
