"""Splicing an SAE into a DiT block: the block's output is replaced by the SAE's reconstruction.

Used for the spliced evaluation (sample with x -> x_hat at every step and compare the images with the
unspliced ones of the same seeds). A ``StepObserver``: the sampler tells it the current timestep, which
the TIDE variant conditions on. Both CFG halves are spliced (the block output the model sees is replaced).
"""

from __future__ import annotations

import torch
from torch import nn

from tide_core.capture import BlockHook


class SAESplice(BlockHook):
    """Forward hook on ``transformer_blocks[layer]`` returning the SAE reconstruction of its output."""

    def __init__(self, model: nn.Module, layer: int, sae: nn.Module, steps: set[int] | None = None):
        self.model, self.layer, self.sae, self.steps = model, layer, sae, steps
        self._timestep = 0
        self._active = False

    def begin_step(self, step: int, timestep: int, batch: int, guided: bool) -> None:
        self._timestep = timestep
        self._active = self.steps is None or step in self.steps

    def end_step(self, step: int) -> None:
        self._active = False

    def _hook(self, _module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
        if not self._active:
            return None
        b, n, d = output.shape  # [B', T, D]
        x = output.reshape(b * n, d).float()
        t = torch.full((b * n,), self._timestep, dtype=torch.long, device=x.device)
        with torch.no_grad():
            x_hat = self.sae(x, t).x_hat  # [B'*T, D]
        return x_hat.reshape(b, n, d).to(output.dtype)
