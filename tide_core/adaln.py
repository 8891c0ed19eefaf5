"""The DiT's own timestep modulation, as a target for initialising TIDE's modulation MLP.

The residual stream after block L is what block L+1 normalises and modulates with its adaLN-Zero
(shift_msa, scale_msa), or, after the last block, what the final norm modulates with proj_out_1's
(shift, scale). TIDE suggests starting the SAE's (scale, shift)(t) from that path. We evaluate it for the
null class (the class-agnostic part) at every training timestep; the SAE fits its MLP to it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tide_core.capture import blocks_of


@torch.no_grad()
def adaln_modulation(transformer: nn.Module, layer: int, timesteps: torch.Tensor, null_class: int) -> torch.Tensor:
    """(scale, shift) the DiT applies to the output of block `layer`: [T, 2 * d] (scale first)."""
    blocks = blocks_of(transformer)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} out of range: the model has layers 0..{len(blocks) - 1}")
    param = next(transformer.parameters())
    t = timesteps.to(param.device)
    labels = torch.full_like(t, null_class)
    if layer + 1 < len(blocks):
        norm = blocks[layer + 1].norm1  # AdaLayerNormZero
        emb = norm.linear(norm.silu(norm.emb(t, labels, hidden_dtype=param.dtype)))  # [T, 6d]
        shift, scale = emb.chunk(6, dim=1)[:2]  # shift_msa, scale_msa
    else:
        cond = blocks[0].norm1.emb(t, labels, hidden_dtype=param.dtype)  # [T, d]
        shift, scale = transformer.proj_out_1(F.silu(cond)).chunk(2, dim=1)
    return torch.cat([scale, shift], dim=1).float().cpu()  # [T, 2d]
