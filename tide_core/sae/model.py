"""The sparse autoencoder: TIDE (timestep-modulated TopK), plain TopK, BatchTopK, Matryoshka (each of those
two also with TIDE's modulation) and ReLU + L1, one module.

Recipe (OpenAI, "Scaling and evaluating sparse autoencoders", plus TIDE, arXiv 2503.07050):

* Inputs are multiplied by a fixed ``input_scale`` so their mean L2 norm is sqrt(d_in); the factor is
  estimated from a sample (``init_from_sample``), stored as a buffer and saved, so the public API always
  takes and returns activations in their ORIGINAL scale. Losses and latent values live in the scaled space.
* ``b_dec`` starts at the geometric median of that sample; decoder rows (one per latent, ``W_dec`` is
  [n_latents, d_in]) start random unit-norm and the encoder starts equal to them (the decoder's transpose in
  the usual [d_in, n_latents] convention; the encoder is stored row-per-latent too so both gather rows).
* Decoder rows stay unit norm: the gradient component parallel to each row is removed before the optimizer
  step (``project_decoder_grad_``) and rows are renormalised after it (``normalize_decoder_``).
* AuxK: latents that have not fired in ``dead_tokens_threshold`` tokens are dead; the top ``aux_k`` dead
  pre-activations must reconstruct the residual x - x_hat, weighted by ``aux_coeff`` (zero if none is dead).
  While few latents are dead this goes through dense matmuls over their rows, else the sparse path.
* TIDE: x' = x * (1 + scale(t)) + shift(t) with (scale, shift) = MLP(sinusoidal(t)). The MLP's last layer
  starts at zero, so a fresh TIDE SAE computes exactly what a TopK SAE with the same weights computes;
  with ``time_init="adaln"`` the caller then fits it to the DiT's own adaLN (``fit_time_mlp``). Only the
  encoder sees x'; the reconstruction target is the unmodulated x.

* BatchTopK and Matryoshka (``selection.py``): the batch's B * k largest pre-activations during training,
  a running threshold at inference; Matryoshka's loss averages the MSEs of its nested prefixes.

Every variant but relu selects without autograd (``tide_core.kernels.topk``) and trains through the sparse
autograd functions of ``sparse.py``. Measured on two CPU threads, d_in=128, n_latents=1024, k=32, B=1024 (training step incl.
AdamW, against the dense reference in bench/references.py): 2.4-3.4x depending on the machine
(``bench/sae_train.py``, numbers in bench/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tide_core.kernels import TopKSelection, topk
from tide_core.sae.checkpoint import load_checkpoint, save_checkpoint
from tide_core.sae.outputs import SAELoss, SAEOutput
from tide_core.sae.selection import BatchSelection, batch_topk, nested_decodes, threshold_mask
from tide_core.sae.sparse import SparseLatents, select, sparse_decode
from tide_core.sae.spec import SAESpec

# AuxK goes through dense [B, d] x [d, D] matmuls over the D dead latents while D <= this many times
# aux_k, and through the sparse path beyond. Measured on two CPU threads (B=1024, d=128, n=1024,
# aux_k=64), AuxK's share of a training step: D=2: 0.5 ms dense against 1.6 ms sparse over a masked
# [B, n]; D=50: 1.2 against 2.8 ms; D=256: 3.2 ms either way.
AUX_DENSE_WIDTH = 4


def timestep_embedding(t: Tensor, dim: int, num_train_timesteps: int, max_period: float = 10_000.0) -> Tensor:
    """DiT's sinusoidal embedding [len(t), dim] (cos half, then sin half).

    Timesteps are rescaled to a 0..1000 range first, so the frequencies do what they do in DiT whatever
    the length of the schedule.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * (1000.0 / num_train_timesteps))[:, None] * freqs[None]  # [T, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [T, dim]


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 16, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's iterations from the mean: a centre that outlier tokens (e.g. huge-norm ones) barely move."""
    x = x.double()  # [N, d]
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)  # [N]
        m = (w[:, None] * x).sum(0) / w.sum()
    return m.float()


@dataclass(frozen=True)
class Modulation:
    """TIDE's per-channel affine map at one timestep: x' = x * gain + shift."""

    gain: Tensor  # [d] 1 + scale(t)
    shift: Tensor  # [d]


@dataclass(frozen=True)
class _Pass:
    """Internals of one forward pass that the loss needs besides the output (scaled space)."""

    out: SAEOutput
    xs: Tensor  # [B, d] scaled input: the reconstruction target
    xs_hat: Tensor  # [B, d] reconstruction of xs
    xc: Tensor  # [B, d] encoder input: modulated (tide), scaled, minus b_dec
    pre: Tensor | None  # [B, n] no-grad pre-activations (sparse variants), for AuxK
    nested: list[Tensor] | None = None  # Matryoshka: each prefix's reconstruction of xs [B, d], the last = xs_hat
    threshold: Tensor | None = None  # [] BatchTopK's selection threshold of this batch


class SparseAutoencoder(nn.Module):
    """A TIDE / TopK / BatchTopK / Matryoshka / ReLU sparse autoencoder (see the module docstring for the recipe).

    Build with ``SparseAutoencoder(spec, seed=...)``, then ``init_from_sample(x)`` (the trainer does this
    from the first tokens it sees) before training. ``meta`` is free-form provenance saved in cfg.json.
    """

    def __init__(self, spec: SAESpec, seed: int | None = None, meta: dict[str, Any] | None = None):
        super().__init__()
        self.spec = spec
        self.meta: dict[str, Any] = dict(meta or {})
        self.source: str | None = None  # the checkpoint directory this was loaded from, for error messages
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        d, n = spec.d_in, spec.n_latents
        w_dec = F.normalize(torch.randn(n, d, generator=gen), dim=1)  # [n, d], unit rows
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.clone())  # [n, d]: encoder row j reads latent j
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.time_mlp = self._build_time_mlp(gen) if spec.modulated else None
        self.register_buffer("input_scale", torch.ones(()))
        if spec.selection == "batchtopk":  # -inf until the first training batch: every positive latent fires
            self.register_buffer("threshold", torch.full((), -math.inf))
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def _build_time_mlp(self, gen: torch.Generator | None) -> nn.Sequential:
        spec = self.spec
        mlp = nn.Sequential(nn.Linear(spec.time_embed_dim, spec.time_hidden), nn.SiLU(),
                            nn.Linear(spec.time_hidden, 2 * spec.d_in))
        if gen is not None:  # torch's default init, drawn from the seeded generator so runs repeat
            for layer in (mlp[0], mlp[2]):
                bound = 1.0 / math.sqrt(layer.in_features)
                with torch.no_grad():
                    layer.weight.uniform_(-bound, bound, generator=gen)
                    layer.bias.uniform_(-bound, bound, generator=gen)
        # Zero last layer: scale = shift = 0, i.e. the modulation starts as the identity.
        nn.init.zeros_(mlp[2].weight)
        nn.init.zeros_(mlp[2].bias)
        return mlp

    # --- set-up ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> None:
        """Set ``input_scale`` (mean ||x|| -> sqrt(d_in)) and ``b_dec`` (geometric median) from a sample."""
        x = self._as_acts(x)
        mean_norm = float(x.double().norm(dim=1).mean())
        if not math.isfinite(mean_norm) or mean_norm <= 0:
            raise ValueError(
                f"cannot initialise the SAE from a sample of {len(x)} tokens whose mean norm is {mean_norm}: "
                "the activations are all zero or not finite; check the capture"
            )
        self.input_scale.fill_(math.sqrt(self.spec.d_in) / mean_norm)
        self.b_dec.copy_(geometric_median(x * self.input_scale))
        self.initialised.fill_(True)

    def check_input(self, d_in: int) -> None:
        """Raise a clear ValueError if activations with ``d_in`` channels do not fit this SAE."""
        if d_in != self.spec.d_in:
            where = self.source or "(not saved)"
            raise ValueError(
                f"SAE at {where} expects d_in={self.spec.d_in} but the activations have {d_in} channels: "
                "use the SAE trained for this layer and site, or retrain it"
            )

    def fit_time_mlp(self, timesteps: Tensor, target: Tensor, steps: int = 400, lr: float = 3e-3) -> float:
        """Initialise TIDE's modulation from a given (scale, shift) per timestep (e.g. the DiT's adaLN,
        ``tide_core.adaln``): fit the MLP to ``target`` [T, 2 * d_in] (scale first) at ``timesteps`` [T].
        Returns the final mean squared error of the fit. Only for the modulated (tide) variants."""
        if self.time_mlp is None:
            raise ValueError(f"variant {self.spec.variant!r} has no timestep modulation to initialise")
        if target.shape != (len(timesteps), 2 * self.spec.d_in):
            raise ValueError(f"target must be [T, 2 * d_in] = [{len(timesteps)}, {2 * self.spec.d_in}], "
                             f"got {tuple(target.shape)}")
        emb = timestep_embedding(timesteps, self.spec.time_embed_dim, self.spec.num_train_timesteps)  # [T, E]
        target = target.to(emb)
        opt = torch.optim.Adam(self.time_mlp.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.mse_loss(self.time_mlp(emb), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return float(loss.detach())

    # --- input handling --------------------------------------------------------------------------------

    def _as_acts(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        if x.ndim != 2:
            raise ValueError(f"activations must be [tokens, d_in]; got shape {tuple(x.shape)}")
        self.check_input(x.shape[1])
        return x.to(device=self.W_dec.device, dtype=self.W_dec.dtype)

    def _as_timesteps(self, t: Tensor | None, n_tokens: int) -> Tensor | None:
        if not self.spec.modulated:
            return None
        if t is None:
            raise ValueError(
                f"variant {self.spec.variant!r} needs the diffusion timestep of every token: pass t as an int "
                "tensor [B] (TokenBatch.timesteps), or use a variant without TIDE's modulation"
            )
        t = torch.as_tensor(t, device=self.W_dec.device)
        if t.shape != (n_tokens,):
            raise ValueError(f"timesteps must have shape [{n_tokens}] (one per token); got {tuple(t.shape)}")
        # [0, num_train_timesteps]: flow matching's first step (sigma = 1) is the end point itself
        if n_tokens and (int(t.min()) < 0 or int(t.max()) > self.spec.num_train_timesteps):
            raise ValueError(
                f"timesteps span [{int(t.min())}, {int(t.max())}] but the SAE was built for "
                f"num_train_timesteps={self.spec.num_train_timesteps}: set SAESpec.num_train_timesteps to the "
                "DiT's schedule length"
            )
        return t

    @torch.no_grad()
    def timestep_modulation(self, timestep: int) -> Modulation | None:
        """TIDE's modulation at one timestep, x' = x * gain + shift (None for the other variants): what
        ``_modulate`` applies to every token of that timestep, for kernels that fuse it."""
        if self.time_mlp is None:
            return None
        scale, shift = self._time_mlp(self._as_timesteps(torch.tensor([timestep]), 1))[0].chunk(2)  # [d] each
        return Modulation(gain=1 + scale, shift=shift)

    def _time_mlp(self, t: Tensor) -> Tensor:
        """The time MLP's output [U, 2d] (scale, shift) at distinct timesteps t [U]."""
        return self.time_mlp(timestep_embedding(t, self.spec.time_embed_dim, self.spec.num_train_timesteps))

    def _modulate(self, xs: Tensor, t: Tensor | None) -> Tensor:
        """TIDE: x' = x * (1 + scale(t)) + shift(t); identity for the other variants."""
        if self.time_mlp is None:
            return xs
        # Tokens share few distinct timesteps (one per sampling step), so run the MLP once per timestep.
        uniq, inverse = torch.unique(t, return_inverse=True)
        mod = self._time_mlp(uniq)  # [U, 2d]
        # One timestep (a feature-pass chunk): broadcast [1, 2d] rather than gather B equal rows. Else
        # index_select, not mod[inverse]: the backward of indexing (an accumulating index_put) made
        # two-thread training differ run to run; index_select's (index_add_) does not.
        scale, shift = (mod if len(uniq) == 1 else mod.index_select(0, inverse)).chunk(2, dim=1)  # [B or 1, d] each
        return xs * (1 + scale) + shift

    # --- encode / decode -------------------------------------------------------------------------------

    def _pre_acts(self, xc: Tensor) -> Tensor:
        """Dense pre-activations [B, n] of encoder inputs xc [B, d], without autograd (only for selection)."""
        with torch.no_grad():
            # mm then add_: addmm first copies the broadcast bias into the output, ~15% slower on CPU
            return torch.mm(xc, self.W_enc.t()).add_(self.b_enc)  # [B, n]

    def _run(self, x: Tensor, t: Tensor | None, training: bool = False) -> _Pass:
        """One pass; ``training`` selects a batch variant's latents over the batch (else by its threshold)."""
        x = self._as_acts(x)
        t = self._as_timesteps(t, x.shape[0])
        xs = x * self.input_scale  # [B, d] scaled target
        xc = self._modulate(xs, t) - self.b_dec  # [B, d] encoder input
        selection = self.spec.selection
        if selection == "relu" or (selection == "batchtopk" and not training):
            z = self._dense_latents(F.linear(xc, self.W_enc, self.b_enc))  # [B, n]
            xs_hat = z @ self.W_dec + self.b_dec
            out = SAEOutput(xs_hat / self.input_scale, self.spec.n_latents, z=z)
            return _Pass(out=out, xs=xs, xs_hat=xs_hat, xc=xc, pre=None)
        pre = self._pre_acts(xc)
        batch: BatchSelection | None = batch_topk(pre, self.spec.k) if selection == "batchtopk" else None
        if batch is None:
            sel = select(xc, self.W_enc, self.b_enc, topk(pre, self.spec.k))  # [B, k]
        else:  # packed rows [R, width], each reading its token's encoder input
            sel = select(xc.index_select(0, batch.rows), self.W_enc, self.b_enc, batch.top)
        rows = None if batch is None else batch.rows
        nested = [h + self.b_dec for h in nested_decodes(sel.idx, sel.val, self.W_dec, sel.pairs,
                                                         self.spec.nested_widths, rows, len(xs))]  # each [B, d]
        out = SAEOutput(nested[-1] / self.input_scale, self.spec.n_latents, idx=sel.idx, val=sel.val, rows=rows)
        return _Pass(out=out, xs=xs, xs_hat=nested[-1], xc=xc, pre=pre, nested=nested,
                     threshold=batch.threshold if batch else None)

    def _dense_latents(self, pre: Tensor) -> Tensor:
        """Inference latents [B, n] from pre-activations [B, n]: ReLU, or a batch variant's threshold."""
        return threshold_mask(pre, self.threshold) if self.spec.selection == "batchtopk" else F.relu(pre)

    def encode_sparse(self, x: Tensor, t: Tensor | None = None) -> SparseLatents:
        """TopK latents (idx, val) of activations x [B, d_in]; t [B] int timesteps (required for tide)."""
        if not self.spec.is_topk:
            raise ValueError(f"encode_sparse() is for the per-token TopK variants (tide, topk); a "
                             f"{self.spec.variant} SAE fires a varying number of latents: use encode()")
        xc = self.encoder_input(x, t)
        sel = select(xc, self.W_enc, self.b_enc, topk(self._pre_acts(xc), self.spec.k))
        return SparseLatents(sel.idx, sel.val)

    def encoder_input(self, x: Tensor, t: Tensor | int | None = None) -> Tensor:
        """What the encoder reads for activations x [B, d_in]: scaled, TIDE-modulated at timesteps t ([B]
        ints, or one int for every token), minus b_dec: xc [B, d_in]."""
        x = self._as_acts(x)
        if isinstance(t, int):  # one timestep: validated and modulated once, broadcast over the tokens
            t = self._as_timesteps(torch.tensor([t]), 1)
        else:
            t = self._as_timesteps(t, x.shape[0])
        return self._modulate(x * self.input_scale, t) - self.b_dec  # [B, d]

    def encode(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """Dense latents z [B, n_latents] (>= 0, at most k nonzero per token for TopK variants)."""
        if self.spec.is_topk:
            lat = self.encode_sparse(x, t)
            return lat.val.new_zeros(lat.val.shape[0], self.spec.n_latents).scatter_(1, lat.idx, lat.val)
        return self._dense_latents(F.linear(self.encoder_input(x, t), self.W_enc, self.b_enc))  # [B, n]

    def decode(self, z: Tensor) -> Tensor:
        """Activations [B, d_in] (original scale) from dense latents z [B, n_latents]."""
        return (z @ self.W_dec + self.b_dec) / self.input_scale

    def decode_sparse(self, idx: Tensor, val: Tensor) -> Tensor:
        """Activations [B, d_in] (original scale) from sparse latents idx, val [B, k]."""
        return (sparse_decode(idx, val, self.W_dec) + self.b_dec) / self.input_scale

    def forward(self, x: Tensor, t: Tensor | None = None) -> SAEOutput:
        return self._run(x, t).out

    # --- loss ------------------------------------------------------------------------------------------

    def dead_mask(self) -> Tensor:
        """Latents that have not fired in the last ``dead_tokens_threshold`` training tokens [n] bool."""
        return self.tokens_since_fired >= self.spec.dead_tokens_threshold

    @torch.no_grad()
    def record_fires(self, fire_counts: Tensor, n_tokens: int) -> None:
        """Advance the dead-latent counters by one training batch of ``n_tokens`` tokens."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fire_counts > 0] = 0

    @torch.no_grad()
    def record_threshold(self, batch_threshold: Tensor | None) -> None:
        """Batch variants: move the inference threshold towards a training batch's (a running average)."""
        if batch_threshold is None:
            return
        if torch.isfinite(self.threshold):
            self.threshold.lerp_(batch_threshold.to(self.threshold), self.spec.threshold_rate)
        else:
            self.threshold.copy_(batch_threshold)

    def _aux_loss(self, xc: Tensor, pre: Tensor, residual: Tensor) -> Tensor:
        """AuxK: the top aux_k dead latents reconstruct the residual; normalised by its variance."""
        dead_ids = self.dead_mask().nonzero()[:, 0]  # [D] ascending latent ids
        if len(dead_ids) == 0 or self.spec.aux_coeff == 0:
            return xc.new_zeros(())
        # Only the dead latents' columns matter: selecting among them ([B, D], not a masked [B, n]) gives
        # the same set, ties still to the lower latent id, at a fraction of the cost when few are dead.
        dead_pre = pre.index_select(1, dead_ids)  # [B, D] no-grad
        k = min(self.spec.aux_k, len(dead_ids))
        if len(dead_ids) <= AUX_DENSE_WIDTH * k:
            residual_hat = self._aux_dense(xc, dead_pre, dead_ids, k)
        else:
            residual_hat = self._aux_sparse(xc, dead_pre, dead_ids, k)
        denom = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        return self.spec.aux_coeff * (residual_hat - residual).pow(2).sum() / denom

    def _aux_dense(self, xc: Tensor, dead_pre: Tensor, dead_ids: Tensor, k: int) -> Tensor:
        """AuxK's reconstruction [B, d] through the dead latents' own rows, dense: a few [B, d] x [d, D]
        matmuls, cheaper than the sparse machinery while D is at most a few times k."""
        w_enc = self.W_enc.index_select(0, dead_ids)  # [D, d]
        z = F.relu(F.linear(xc, w_enc, self.b_enc.index_select(0, dead_ids)))  # [B, D]
        if k < len(dead_ids):
            keep = torch.zeros_like(dead_pre, dtype=torch.bool).scatter_(1, topk(dead_pre, k).indices, True)
            z = z * keep  # [B, D]: the top k of each row
        return z @ self.W_dec.index_select(0, dead_ids)  # [B, d]; no bias: the residual is centred

    def _aux_sparse(self, xc: Tensor, dead_pre: Tensor, dead_ids: Tensor, k: int) -> Tensor:
        """AuxK's reconstruction [B, d] through the sparse path, as the main reconstruction (many dead)."""
        top = topk(dead_pre, k)
        top = TopKSelection(top.values, dead_ids[top.indices])  # [B, k] latent ids
        sel = select(xc, self.W_enc, self.b_enc, top)  # [B, k]
        return sparse_decode(sel.idx, sel.val, self.W_dec, sel.pairs)  # [B, d]

    def loss(self, x: Tensor, t: Tensor | None = None) -> SAELoss:
        """Training loss of a batch x [B, d_in] with timesteps t [B] (tide only), in the scaled space."""
        p = self._run(x, t, training=True)
        mse = (p.xs_hat - p.xs).pow(2).mean()
        aux = l1 = mse.new_zeros(())
        recon = mse
        if self.spec.sparse:
            aux = self._aux_loss(p.xc, p.pre, (p.xs - p.xs_hat).detach())
            if len(p.nested) > 1:  # Matryoshka: every prefix reconstructs; the last is the whole dictionary
                recon = torch.stack([(h - p.xs).pow(2).mean() for h in p.nested]).mean()
        else:
            l1 = self.spec.l1_coeff * (p.out.z * self.W_dec.norm(dim=1)).sum(1).mean()
        return SAELoss(total=recon + aux + l1, mse=mse, aux=aux, l1=l1, output=p.out, threshold=p.threshold)

    # --- decoder norm recipe ---------------------------------------------------------------------------

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from W_dec's gradient its component along each (unit) row: the step then keeps norms ~1."""
        if self.W_dec.grad is not None:
            g = self.W_dec.grad  # [n, d]
            g -= (g * self.W_dec).sum(1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.copy_(F.normalize(self.W_dec, dim=1))

    # --- checkpoint (checkpoint.py) --------------------------------------------------------------------

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write ``<path>/cfg.json`` + ``<path>/sae.safetensors`` atomically (temp dir, then rename).

        ``meta`` (e.g. layer, site, tokens seen) is merged into ``self.meta`` and stored in cfg.json.
        """
        return save_checkpoint(self, path, meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
        """Rebuild an SAE saved by ``save`` (weights, input scale and dead-latent counters)."""
        return load_checkpoint(cls, path, device)
