"""Sparse autoencoders on DiT activations: TIDE (timestep-modulated TopK), plain TopK and ReLU + L1.

One module, read top to bottom:

1. ``SAESpec``: the validated architecture (what ``cfg.json`` stores).
2. Helpers: the DiT-style sinusoidal timestep embedding, a geometric median for ``b_dec``.
3. The sparse machinery that makes TopK training cheap: ``topk_exact`` and two custom autograd functions.
4. ``SparseAutoencoder``: the model, its loss and the decoder-norm recipe, save / load.
5. ``DenseTopKReference``: the plainest correct dense TopK SAE, for benchmarks and equality tests.

Recipe (OpenAI, "Scaling and evaluating sparse autoencoders", plus TIDE, arXiv 2503.07050):

* Inputs are multiplied by a fixed ``input_scale`` so their mean L2 norm is sqrt(d_in); the factor is
  estimated from a sample (``init_from_sample``), stored as a buffer and saved, so the public API always
  takes and returns activations in their ORIGINAL scale. Losses and latent values live in the scaled space.
* ``b_dec`` starts at the geometric median of that sample; decoder rows (one per latent, ``W_dec`` is
  [n_latents, d_in]) start random unit-norm and the encoder starts equal to them (the decoder's transpose in
  the usual [d_in, n_latents] convention; we store the encoder row-per-latent too so both gather rows).
* Decoder rows stay unit norm: the gradient component parallel to each row is removed before the optimizer
  step (``project_decoder_grad_``) and rows are renormalised after it (``normalize_decoder_``).
* AuxK: latents that have not fired in ``dead_tokens_threshold`` tokens are dead; the top ``aux_k`` dead
  pre-activations must reconstruct the residual x - x_hat, weighted by ``aux_coeff`` (zero if none is dead).
* TIDE: x' = x * (1 + scale(t)) + shift(t) with (scale, shift) = MLP(sinusoidal(t)); the MLP's last layer
  starts at zero, so a fresh TIDE SAE computes exactly what a TopK SAE with the same weights computes. Only
  the encoder sees x'; the reconstruction target is the unmodulated x. (TIDE also suggests initialising the
  MLP from the DiT's own adaLN timestep embedder; we do not: it starts at the identity and is learned.)

Why TopK training is fast here: the encoder matmul x @ W_enc^T ([B, n_latents]) is unavoidable, but nothing
else needs the dense latent. The top-k indices are picked without autograd (``topk_exact``: on CPU a
compiled kernel from ``tide_core.topk``, ~10x faster than torch.topk), their values get a custom backward
that touches only the k selected encoder rows, and decoding is an ``embedding_bag`` over the k active
decoder rows. Both weight gradients are sparse [n_latents, B] @ [B, d_in] products sharing one grouping of
the (token, latent) pairs by latent (a compiled counting sort on CPU). A plain dense version does five
[B x d_in x n_latents] matmuls per step (encode, decode, three in backward); this one does one. Measured
on two CPU threads, d_in=128, n_latents=1024, k=32, B=1024 (training step incl. AdamW, vs
``DenseTopKReference``): 2.4x (``bench/sae_train.py``, numbers in bench/RESULTS.md).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
CHECKPOINT_FORMAT = 1
TOPK_VARIANTS = ("tide", "topk")


# ----------------------------------------------------------------------------------------------------------
# 1. The spec
# ----------------------------------------------------------------------------------------------------------


class SAESpec(BaseModel):
    """Architecture and loss of one sparse autoencoder (everything needed to rebuild it from cfg.json)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    d_in: int = Field(ge=1)
    """Width of the activations (channels per token)."""
    n_latents: int = Field(ge=1)
    """Dictionary size: number of latents (features)."""
    k: int = Field(32, ge=1)
    """Active latents per token for the TopK variants (tide, topk); ignored by relu."""
    variant: Literal["tide", "topk", "relu"] = "tide"
    """tide = TopK with timestep modulation of the input; topk = plain TopK; relu = ReLU + L1 baseline."""
    l1_coeff: float = Field(0.05, ge=0.0)
    """relu only: weight of sum_i z_i * ||W_dec row i|| against the per-channel MSE (both in the scaled space
    where mean ||x|| = sqrt(d_in)). A starting point: tune it until L0 is near the TopK variants' k."""
    aux_k: int | None = Field(None, ge=1)
    """Dead latents used by the AuxK loss; default min(n_latents, max(k, d_in // 2)) (OpenAI: ~d_in / 2)."""
    aux_coeff: float = Field(1 / 32, ge=0.0)
    """Weight of the AuxK loss (OpenAI uses 1/32); 0 disables it."""
    dead_tokens_threshold: int = Field(200_000, ge=1)
    """A latent is dead once it has not fired on any of this many consecutive training tokens."""
    num_train_timesteps: int = Field(1000, ge=1)
    """tide only: length of the DiT's diffusion schedule; timesteps must lie in [0, num_train_timesteps)."""
    time_embed_dim: int = Field(64, ge=2)
    """tide only: width of the sinusoidal timestep embedding (even)."""
    time_hidden: int = Field(128, ge=1)
    """tide only: hidden width of the MLP mapping the embedding to (scale, shift)."""

    @model_validator(mode="after")
    def _check(self) -> SAESpec:
        if self.k > self.n_latents:
            raise ValueError(
                f"k={self.k} must be <= n_latents={self.n_latents}: lower k or widen the dictionary"
            )
        if self.time_embed_dim % 2:
            raise ValueError(f"time_embed_dim={self.time_embed_dim} must be even (cos and sin halves)")
        if self.aux_k is None:
            self.aux_k = min(self.n_latents, max(self.k, self.d_in // 2))
        elif self.aux_k > self.n_latents:
            raise ValueError(f"aux_k={self.aux_k} must be <= n_latents={self.n_latents}")
        return self

    @property
    def is_topk(self) -> bool:
        return self.variant in TOPK_VARIANTS


# ----------------------------------------------------------------------------------------------------------
# 2. Helpers
# ----------------------------------------------------------------------------------------------------------


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
class SparseLatents:
    """TopK latents of a batch in sparse form."""

    idx: Tensor  # [B, k] long: which latents
    val: Tensor  # [B, k] float >= 0: their activations (zero where a top-k pre-activation was negative)


@dataclass(frozen=True)
class SAEOutput:
    """One forward pass.

    TopK variants fill ``idx``/``val`` (sparse, k per token), relu fills ``z`` (dense). ``dense_latents()``,
    ``l0()`` and ``fire_counts()`` work for both. Latent values are in the SAE's scaled units.
    """

    x_hat: Tensor  # [B, d_in] reconstruction, in the original activation scale
    n_latents: int
    idx: Tensor | None = None  # [B, k] long
    val: Tensor | None = None  # [B, k] >= 0
    z: Tensor | None = None  # [B, n_latents] >= 0

    def dense_latents(self) -> Tensor:
        if self.z is not None:
            return self.z
        b = self.idx.shape[0]
        return self.val.new_zeros(b, self.n_latents).scatter_(1, self.idx, self.val)  # [B, n]

    def l0(self) -> Tensor:
        """Active latents per token [B]."""
        return ((self.z if self.z is not None else self.val) > 0).sum(1)

    def fire_counts(self) -> Tensor:
        """Tokens of this batch on which each latent fired [n_latents] (int64)."""
        if self.z is not None:
            return (self.z > 0).sum(0)
        fired = self.idx[self.val > 0]  # [n_fired]
        return torch.bincount(fired, minlength=self.n_latents)


@dataclass(frozen=True)
class SAELoss:
    """Loss terms of one batch (scalars); ``total`` is what is differentiated."""

    total: Tensor
    mse: Tensor  # mean squared error per channel, in the scaled space
    aux: Tensor  # AuxK term, already multiplied by aux_coeff (0 for relu or when nothing is dead)
    l1: Tensor  # L1 term, already multiplied by l1_coeff (0 for TopK variants)
    output: SAEOutput


@dataclass(frozen=True)
class _Pass:
    """Internals of one forward pass that the loss needs besides the output (scaled space)."""

    out: SAEOutput
    xs: Tensor  # [B, d] scaled input: the reconstruction target
    xs_hat: Tensor  # [B, d] reconstruction of xs
    xc: Tensor  # [B, d] encoder input: modulated (tide), scaled, minus b_dec
    pre: Tensor | None  # [B, n] no-grad pre-activations (TopK variants), for AuxK


# ----------------------------------------------------------------------------------------------------------
# 3. The sparse gradient of selected pre-activations
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Modulation:
    """TIDE's per-channel affine map at one timestep: x' = x * gain + shift."""

    gain: Tensor  # [d] 1 + scale(t)
    shift: Tensor  # [d]


@dataclass(frozen=True)
class TopKSelection:
    """The k largest entries of each row."""

    values: Tensor  # [B, k], in no particular order
    indices: Tensor  # [B, k] long


@torch.no_grad()
def topk_exact(pre: Tensor, k: int) -> TopKSelection:
    """The exact top-k of each row of pre [B, n], faster than torch.topk on CPU (where ties go to the lower
    latent id; elsewhere torch breaks them).

    torch.topk on CPU costs ~4.5 µs per 1024-wide row, half a TopK SAE's training step; the compiled
    kernel of ``tide_core.topk`` does the same exactly in ~0.45 µs and splits rows over the intra-op
    threads. On other devices (and for a row with a NaN) torch.topk is used as is.
    """
    if pre.device.type == "cpu" and pre.dtype == torch.float32 and k < pre.shape[1]:
        from tide_core.topk import topk_rows

        top = topk_rows(pre.detach().contiguous().numpy(), k, threads=torch.get_num_threads())
        if top.ok:
            return TopKSelection(torch.from_numpy(top.values), torch.from_numpy(top.indices))
    top = pre.topk(k, dim=1, sorted=False)
    return TopKSelection(top.values, top.indices)


class _Pairs:
    """The B*k (token, latent) pairs of a selection idx [B, k], sorted by latent.

    Weight gradients of the sparse encoder and decoder are sums over the tokens each latent was active
    on: in this order each is one CSR [n_latents, B] @ [B, d] product, and both share one sort.
    """

    def __init__(self, idx: Tensor, n_latents: int):
        b, _ = idx.shape
        if idx.device.type == "cpu":
            from tide_core.topk import pairs_by_latent

            p = pairs_by_latent(idx.numpy(), n_latents)
            self.order, self.tokens, self.crow = (torch.from_numpy(a) for a in (p.order, p.tokens, p.crow))
        else:
            flat = idx.reshape(-1)  # [B*k]
            self.order = flat.argsort(stable=True)  # [B*k] pair positions, grouped by latent
            self.tokens = self.order // idx.shape[1]  # [B*k] token of each sorted pair
            self.crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=idx.device)  # [n+1]
            torch.cumsum(torch.bincount(flat, minlength=n_latents), 0, out=self.crow[1:])
        self.idx = idx
        self.shape = (n_latents, b)

    def latent_sums(self, weights: Tensor, rows: Tensor) -> Tensor:
        """out[l] = sum over pairs (b, j) with idx[b, j] = l of weights[b, j] * rows[b]  ->  [n_latents, d]."""
        w = weights.reshape(-1)[self.order]  # [B*k], in pair order
        with warnings.catch_warnings():
            # torch calls CSR tensors "beta"; this product is tested against the dense reference.
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            csr = torch.sparse_csr_tensor(self.crow, self.tokens, w, self.shape, check_invariants=False)  # [n, B]
        return csr @ rows


class _SelectedPreActs(torch.autograd.Function):
    """pre[b, j] = xc[b] . W_enc[idx[b, j]] + b_enc[idx[b, j]] for the selected latents idx [B, m].

    The forward values were already computed by the dense no-grad encoder matmul, so the forward only
    returns them; the backward is what matters: it never builds the dense [B, n_latents] gradient.
    """

    @staticmethod
    def forward(ctx, xc: Tensor, w_enc: Tensor, b_enc: Tensor, pairs: _Pairs, values: Tensor) -> Tensor:
        ctx.save_for_backward(xc, w_enc)
        ctx.pairs = pairs
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, w_enc = ctx.saved_tensors
        pairs: _Pairs = ctx.pairs
        g = grad.contiguous()  # [B, m]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(pairs.idx, w_enc, per_sample_weights=g, mode="sum")  # [B, d]
        if ctx.needs_input_grad[1]:
            grad_w = pairs.latent_sums(g, xc)  # [n, d]
        if ctx.needs_input_grad[2]:
            grad_b = g.new_zeros(w_enc.shape[0]).index_add_(0, pairs.idx.reshape(-1), g.reshape(-1))  # [n]
        return grad_x, grad_w, grad_b, None, None


class _SparseDecode(torch.autograd.Function):
    """sum_j val[b, j] * W_dec[idx[b, j]] -> [B, d]: a gather of the k active decoder rows per token."""

    @staticmethod
    def forward(ctx, val: Tensor, w_dec: Tensor, pairs: _Pairs) -> Tensor:
        ctx.save_for_backward(val, w_dec)
        ctx.pairs = pairs
        return F.embedding_bag(pairs.idx, w_dec, per_sample_weights=val, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        val, w_dec = ctx.saved_tensors
        pairs: _Pairs = ctx.pairs
        grad = grad.contiguous()  # [B, d]
        grad_val = grad_w = None
        if ctx.needs_input_grad[0]:
            # d/dval[b, j] = W_dec[idx[b, j]] . grad[b]: embedding_bag's own backward computes exactly that
            # without materialising the [B, k, d] gathered rows.
            with torch.enable_grad():
                v = val.detach().requires_grad_()
                out = F.embedding_bag(pairs.idx, w_dec.detach(), per_sample_weights=v, mode="sum")
                (grad_val,) = torch.autograd.grad(out, v, grad)
        if ctx.needs_input_grad[1]:
            grad_w = pairs.latent_sums(val, grad)  # [n, d]
        return grad_val, grad_w, None


def _sparse_decode(idx: Tensor, val: Tensor, w_dec: Tensor, pairs: _Pairs | None = None) -> Tensor:
    """sum_j val[b, j] * W_dec[idx[b, j]] -> [B, d_in]; pass ``pairs`` to reuse a sort shared with the encoder."""
    if not (torch.is_grad_enabled() and (val.requires_grad or w_dec.requires_grad)):
        return F.embedding_bag(idx, w_dec, per_sample_weights=val, mode="sum")
    return _SparseDecode.apply(val, w_dec, pairs if pairs is not None else _Pairs(idx, w_dec.shape[0]))


@dataclass(frozen=True)
class _Selected:
    """Selected latents of a batch, with the pair plan their gradients share (None without autograd)."""

    idx: Tensor  # [B, m] long
    val: Tensor  # [B, m] >= 0
    pairs: _Pairs | None


# ----------------------------------------------------------------------------------------------------------
# 4. The model
# ----------------------------------------------------------------------------------------------------------


class SparseAutoencoder(nn.Module):
    """A TIDE / TopK / ReLU sparse autoencoder (see the module docstring for the recipe).

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
        if spec.variant == "tide":
            self.time_mlp = nn.Sequential(
                nn.Linear(spec.time_embed_dim, spec.time_hidden),
                nn.SiLU(),
                nn.Linear(spec.time_hidden, 2 * d),
            )
            if gen is not None:
                for layer in (self.time_mlp[0], self.time_mlp[2]):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    with torch.no_grad():
                        layer.weight.uniform_(-bound, bound, generator=gen)
                        layer.bias.uniform_(-bound, bound, generator=gen)
            # Zero last layer: scale = shift = 0, i.e. the modulation starts as the identity.
            nn.init.zeros_(self.time_mlp[2].weight)
            nn.init.zeros_(self.time_mlp[2].bias)
        else:
            self.time_mlp = None
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("tokens_since_fired", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

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
        Returns the final mean squared error of the fit. Only for the ``tide`` variant."""
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
        if self.spec.variant != "tide":
            return None
        if t is None:
            raise ValueError(
                "variant 'tide' needs the diffusion timestep of every token: pass t as an int tensor [B] "
                "(TokenBatch.timesteps), or use a 'topk' SAE"
            )
        t = torch.as_tensor(t, device=self.W_dec.device)
        if t.shape != (n_tokens,):
            raise ValueError(f"timesteps must have shape [{n_tokens}] (one per token); got {tuple(t.shape)}")
        if n_tokens and (int(t.min()) < 0 or int(t.max()) >= self.spec.num_train_timesteps):
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

    def _select(self, xc: Tensor, top: TopKSelection) -> _Selected:
        """ReLU'd values of the selected pre-activations, differentiable through the sparse backward."""
        if not (torch.is_grad_enabled() and (xc.requires_grad or self.W_enc.requires_grad)):
            return _Selected(top.indices, F.relu(top.values), None)
        pairs = _Pairs(top.indices, self.spec.n_latents)
        val = F.relu(_SelectedPreActs.apply(xc, self.W_enc, self.b_enc, pairs, top.values))  # [B, m]
        return _Selected(top.indices, val, pairs)

    def _run(self, x: Tensor, t: Tensor | None) -> _Pass:
        x = self._as_acts(x)
        t = self._as_timesteps(t, x.shape[0])
        xs = x * self.input_scale  # [B, d] scaled target
        xc = self._modulate(xs, t) - self.b_dec  # [B, d] encoder input
        if not self.spec.is_topk:
            z = F.relu(F.linear(xc, self.W_enc, self.b_enc))  # [B, n]
            xs_hat = z @ self.W_dec + self.b_dec
            out = SAEOutput(xs_hat / self.input_scale, self.spec.n_latents, z=z)
            return _Pass(out=out, xs=xs, xs_hat=xs_hat, xc=xc, pre=None)
        pre = self._pre_acts(xc)
        sel = self._select(xc, topk_exact(pre, self.spec.k))  # [B, k]
        xs_hat = _sparse_decode(sel.idx, sel.val, self.W_dec, sel.pairs) + self.b_dec  # [B, d]
        out = SAEOutput(xs_hat / self.input_scale, self.spec.n_latents, idx=sel.idx, val=sel.val)
        return _Pass(out=out, xs=xs, xs_hat=xs_hat, xc=xc, pre=pre)

    def encode_sparse(self, x: Tensor, t: Tensor | None = None) -> SparseLatents:
        """TopK latents (idx, val) of activations x [B, d_in]; t [B] int timesteps (required for tide)."""
        if not self.spec.is_topk:
            raise ValueError("encode_sparse() is for the TopK variants; use encode() for a relu SAE")
        xc = self.encoder_input(x, t)
        sel = self._select(xc, topk_exact(self._pre_acts(xc), self.spec.k))
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
        x = self._as_acts(x)
        return F.relu(F.linear(x * self.input_scale - self.b_dec, self.W_enc, self.b_enc))  # [B, n]

    def decode(self, z: Tensor) -> Tensor:
        """Activations [B, d_in] (original scale) from dense latents z [B, n_latents]."""
        return (z @ self.W_dec + self.b_dec) / self.input_scale

    def decode_sparse(self, idx: Tensor, val: Tensor) -> Tensor:
        """Activations [B, d_in] (original scale) from sparse latents idx, val [B, k]."""
        return (_sparse_decode(idx, val, self.W_dec) + self.b_dec) / self.input_scale

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

    def _aux_loss(self, xc: Tensor, pre: Tensor, residual: Tensor) -> Tensor:
        """AuxK: the top aux_k dead latents reconstruct the residual; normalised by its variance."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0 or self.spec.aux_coeff == 0:
            return xc.new_zeros(())
        with torch.no_grad():
            top = topk_exact(pre.masked_fill(~dead, float("-inf")), min(self.spec.aux_k, n_dead))
        sel = self._select(xc, top)  # [B, aux_k]
        residual_hat = _sparse_decode(sel.idx, sel.val, self.W_dec, sel.pairs)  # [B, d]; no bias: e is centred
        denom = (residual - residual.mean(0)).pow(2).sum().clamp_min(1e-12)
        return self.spec.aux_coeff * (residual_hat - residual).pow(2).sum() / denom

    def loss(self, x: Tensor, t: Tensor | None = None) -> SAELoss:
        """Training loss of a batch x [B, d_in] with timesteps t [B] (tide only), in the scaled space."""
        p = self._run(x, t)
        mse = (p.xs_hat - p.xs).pow(2).mean()
        aux = l1 = mse.new_zeros(())
        if self.spec.is_topk:
            aux = self._aux_loss(p.xc, p.pre, (p.xs - p.xs_hat).detach())
        else:
            l1 = self.spec.l1_coeff * (p.out.z * self.W_dec.norm(dim=1)).sum(1).mean()
        return SAELoss(total=mse + aux + l1, mse=mse, aux=aux, l1=l1, output=p.out)

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

    # --- checkpoint ------------------------------------------------------------------------------------

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write ``<path>/cfg.json`` + ``<path>/sae.safetensors`` atomically (temp dir, then rename).

        ``meta`` (e.g. layer, site, tokens seen) is merged into ``self.meta`` and stored in cfg.json.
        """
        path = Path(path)
        if meta:
            self.meta.update(meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            cfg = {"format": CHECKPOINT_FORMAT, "variant": self.spec.variant,
                   "spec": self.spec.model_dump(), "meta": self.meta}
            (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
            tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                path.rename(old / path.name)
                tmp.rename(path)
                shutil.rmtree(old)
            else:
                tmp.rename(path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        self.source = str(path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
        """Rebuild an SAE saved by ``save`` (weights, input scale and dead-latent counters)."""
        path = Path(path)
        if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{path} is not an SAE checkpoint: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
        cfg = json.loads((path / CONFIG_FILE).read_text())
        if cfg.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"SAE checkpoint {path} has format {cfg.get('format')}; this code reads "
                             f"format {CHECKPOINT_FORMAT}: retrain or convert it")
        sae = cls(SAESpec.model_validate(cfg["spec"]), meta=cfg.get("meta"))
        sae.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
        sae.source = str(path)
        return sae.to(device)


# ----------------------------------------------------------------------------------------------------------
# 5. The dense reference
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseOutput:
    """Forward pass of the dense reference (scaled space)."""

    xs_hat: Tensor  # [B, d_in] reconstruction of the scaled input
    z: Tensor  # [B, n_latents] dense latents
    mse: Tensor  # scalar, same definition as SAELoss.mse


class DenseTopKReference(nn.Module):
    """The plainest correct TopK SAE: dense latents via scatter, dense decoder matmul, plain autograd.

    Same parameters and loss (MSE only) as a ``topk`` SparseAutoencoder; for the speed benchmark and to
    check that the sparse path computes the same values and gradients.
    """

    def __init__(self, d_in: int, n_latents: int, k: int):
        super().__init__()
        self.k = k
        self.W_enc = nn.Parameter(F.normalize(torch.randn(n_latents, d_in), dim=1))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(self.W_enc.detach().clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_scale", torch.ones(()))

    @classmethod
    def from_sae(cls, sae: SparseAutoencoder) -> DenseTopKReference:
        """A reference with a copy of a TopK SAE's weights."""
        ref = cls(sae.spec.d_in, sae.spec.n_latents, sae.spec.k)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "input_scale"):
                getattr(ref, name).copy_(getattr(sae, name))
        return ref

    def forward(self, x: Tensor) -> DenseOutput:
        xs = x * self.input_scale
        pre = F.linear(xs - self.b_dec, self.W_enc, self.b_enc)  # [B, n]
        top = pre.topk(self.k, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))  # [B, n]
        xs_hat = z @ self.W_dec + self.b_dec  # [B, d]
        return DenseOutput(xs_hat=xs_hat, z=z, mse=(xs_hat - xs).pow(2).mean())
