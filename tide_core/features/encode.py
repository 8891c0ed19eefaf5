"""Encoding stored activations for the feature pass: which latents fire on which tokens.

Two paths with the same numbers:

* ``fired_latents``: the SAE's own encode, as (token, latent, value) pairs (any SAE, any device).
* ``count_chunk``: for TopK SAEs on the CPU in float32, the encoder matmul tile by tile, then one kernel
  sweep that adds the bias, selects each token's top k and counts them (no [T, n] bias pass, no pair
  arrays): the same matmul, the same IEEE bias add, the same exact top-k.

``heatmaps`` reads one latent's activation over every token of an image, from the same encode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tide_core.kernels import FeatureCounts, count_topk, encoder_input, workspace


@dataclass(frozen=True)
class Fired:
    """Candidate (token, latent) pairs of a batch; the latent fired where the value is > 0."""

    rows: torch.Tensor  # [m] long token row in the batch
    latents: torch.Tensor  # [m] long
    values: torch.Tensor  # [m] float, > 0 where fired (TopK selections may hold ReLU'd zeros)


@torch.no_grad()
def fired_latents(sae, x: torch.Tensor, timestep: int | None) -> Fired:
    """Encode tokens x [T, d] at one diffusion timestep: every pair that may fire (value > 0 if it does)."""
    t = torch.full((x.shape[0],), int(timestep), dtype=torch.long) if sae.spec.modulated else None
    if sae.spec.is_topk:
        lat = sae.encode_sparse(x, t)  # idx, val [T, k]
        rows = torch.arange(x.shape[0]).repeat_interleave(lat.idx.shape[1])  # [T*k]
        return Fired(rows, lat.idx.reshape(-1), lat.val.reshape(-1))
    z = sae.encode(x, t)  # [T, n]
    rows, latents = z.nonzero(as_tuple=True)
    return Fired(rows, latents, z[rows, latents])


@dataclass(frozen=True)
class ChunkEncoder:
    """A TopK SAE's encoder at one timestep, in the pieces the kernels take (made once per task)."""

    w: torch.Tensor  # [d, n] W_enc^T (a view)
    bias: np.ndarray  # [n] b_enc
    b_dec: np.ndarray  # [d]
    scale: np.float32  # input_scale
    gain: np.ndarray | None  # [d] TIDE's modulation at the timestep (None: no modulation)
    shift: np.ndarray | None  # [d]
    k: int


@torch.no_grad()
def chunk_encoder(sae, timestep: int) -> ChunkEncoder | None:
    """The fused path's encoder, or None where it does not apply (not TopK, not float32 on the CPU)."""
    if not (sae.spec.is_topk and sae.W_enc.device.type == "cpu" and sae.W_enc.dtype == torch.float32):
        return None
    mod = sae.timestep_modulation(timestep)
    gain, shift = (None, None) if mod is None else (mod.gain.numpy(), mod.shift.numpy())
    return ChunkEncoder(w=sae.W_enc.detach().t(), bias=sae.b_enc.detach().numpy(),
                        b_dec=sae.b_dec.detach().numpy(), scale=np.float32(sae.input_scale), gain=gain,
                        shift=shift, k=sae.spec.k)


# The matmul and the sweep go tile by tile, a tile's pre-activations at most this many floats (16 MB): a
# whole chunk in one tile for the default SAE (fewer Python-level calls, which hold the GIL the other
# dask threads wait for), bounded memory for wide ones (a chunk of a 16k-latent SAE would be 256 MB).
TILE_FLOATS = 1 << 22


@torch.no_grad()
def count_chunk(enc: ChunkEncoder, acts: np.ndarray, tokens_per_image: int, first_image: int,
                sample_class: np.ndarray, counts: FeatureCounts) -> int:
    """Count the tokens acts [T, d] of images first_image.. into ``counts`` by the fused path. Returns the
    rows counted: T, or fewer if a tile had a NaN (the rows before that tile; the rest is the caller's)."""
    t, d = acts.shape
    n = enc.w.shape[1]
    x = workspace("x", (t, d))
    torch.from_numpy(x).copy_(torch.from_numpy(acts))  # float16 -> float32 vectorised (numpy's: ~6x slower)
    xc = workspace("xc", (t, d))  # what the encoder reads
    encoder_input(x, enc.scale, enc.gain, enc.shift, enc.b_dec, xc)
    tile = max(1, min(t, TILE_FLOATS // n))
    pre = torch.from_numpy(workspace("pre", (tile, n)))  # [tile, n]: in cache from matmul to sweep
    xc = torch.from_numpy(xc)
    for r0 in range(0, t, tile):
        out = pre[:t - r0]
        torch.mm(xc[r0:r0 + tile], enc.w, out=out)  # [rows, n], bias not yet added
        counted = count_topk(counts, out.numpy(), r0, enc.bias, enc.k, tokens_per_image, first_image,
                             sample_class)
        if not counted:
            return r0
    return t


@torch.no_grad()
def heatmaps(sae, acts: np.ndarray, timestep: int, rows: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """Activation of latents[i] over every token of image rows[i]: acts [m, T, d] (the full token grid of
    m images at one step) -> [len(rows), T]. Sparse throughout, so wide SAEs cost no dense [m, T, n]."""
    m, t, d = acts.shape
    n = sae.spec.n_latents
    x = torch.from_numpy(np.ascontiguousarray(acts, dtype=np.float32)).view(m * t, d)  # [m*T, d]
    f = fired_latents(sae, x, timestep)
    fired_code = (f.rows // t).numpy() * n + f.latents.numpy()  # [pairs] (image, latent)
    codes, inverse = np.unique(np.asarray(rows, np.int64) * n + np.asarray(latents, np.int64), return_inverse=True)
    pos = np.clip(np.searchsorted(codes, fired_code), 0, len(codes) - 1)
    hit = codes[pos] == fired_code  # pairs some request asked for
    grid = np.zeros((len(codes), t), np.float32)  # [U, T]
    grid[pos[hit], (f.rows % t).numpy()[hit]] = f.values.numpy()[hit]
    return grid[inverse]  # [R, T]
