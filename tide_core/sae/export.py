"""Our SAEs as SAELens checkpoints: a directory with ``cfg.json`` and ``sae_weights.safetensors`` that
SAELens 6.x loads with its own loader (``sae_lens.SAE.load_from_disk``), for the tools built on it.

SAELens' ``topk`` and ``standard`` SAEs compute, on activations x [B, d_in] in their original scale,

    z     = act((x - b_dec) @ W_enc + b_enc)     with apply_b_dec_to_input = True
    x_hat = z @ W_dec + b_dec

where act is "top k pre-activations, then ReLU" (topk), ReLU (standard) or "pre-activations above the
latent's threshold" (jumprelu, with a ``threshold`` [d_sae]). Ours (model.py) scales by
s = input_scale, modulates (tide: gain g = 1 + scale(t) and shift h = shift(t); g = 1, h = 0 otherwise),
centres by b_dec and un-scales the reconstruction:

    z     = act((g * s * x + h - b_dec) @ W_enc.T + b_enc)
    x_hat = (z @ W_dec + b_dec) / s

The two agree exactly, latents and reconstructions alike, with (primes are the exported tensors)

    W_dec' = W_dec / s                 b_dec' = b_dec / s
    W_enc' = (s * g)[:, None] * W_enc.T
    b_enc' = b_enc + (h + (g - 1) * b_dec) @ W_enc.T

because (x - b_dec / s) * s * g = g * s * x - g * b_dec. For the unmodulated variants (g = 1, h = 0)
b_enc' = b_enc. The fold leaves the pre-activations' values as they are, so a batch variant's inference
threshold exports unchanged (as SAELens' JumpReLU, one value for every latent). SAELens has no
timestep-conditioned architecture, so a modulated (tide) SAE exports one checkpoint per timestep.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from tide_core.files import atomic_directory

if TYPE_CHECKING:
    from tide_core.sae.model import SparseAutoencoder

SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
# The loader reads a cfg.json whose metadata.sae_lens_version is below 6.0.0 through its pre-6 path, which
# keeps only its own metadata keys; declaring the 6.x layout keeps ours.
SAELENS_FORMAT_VERSION = "6.0.0"
# Our selection rule -> SAELens architecture that computes the same thing once the weights are folded.
ARCHITECTURES: dict[str, str] = {"topk": "topk", "relu": "standard", "batchtopk": "jumprelu"}


@dataclass(frozen=True)
class SAELensWeights:
    """One SAELens checkpoint's tensors, in SAELens' orientation (float32, CPU)."""

    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_in]
    b_dec: Tensor  # [d_in]
    threshold: Tensor | None = None  # [d_sae] jumprelu only

    def state_dict(self) -> dict[str, Tensor]:
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        return tensors if self.threshold is None else {**tensors, "threshold": self.threshold}


@dataclass(frozen=True)
class ExportedCheckpoint:
    """One written SAELens checkpoint directory."""

    path: Path
    architecture: str  # "topk", "standard" or "jumprelu"
    timestep: int | None  # the modulation folded in (tide variants); None for the others


def timestep_dirname(timestep: int) -> str:
    """The subdirectory of a tide export that holds one timestep's checkpoint: t0999, t0020, ..."""
    return f"t{timestep:04d}"


def fold_weights(sae: SparseAutoencoder, timestep: int | None = None) -> SAELensWeights:
    """The exported tensors (see the module docstring): input scale, and for tide the modulation at
    ``timestep``, folded into the encoder; the decoder rescaled to the original activation scale."""
    variant, modulated = sae.spec.variant, sae.spec.modulated
    if modulated != (timestep is not None):
        need = "needs a timestep" if modulated else "takes no timestep (it has no modulation)"
        raise ValueError(f"variant {variant!r} {need}")
    # Fold in float64 and round once at the end, so the export is as close to ours as float32 allows.
    f64 = {name: p.detach().to("cpu", torch.float64)
           for name, p in (("W_enc", sae.W_enc), ("b_enc", sae.b_enc), ("W_dec", sae.W_dec), ("b_dec", sae.b_dec))}
    w_enc, b_dec = f64["W_enc"], f64["b_dec"]  # [n, d] (row per latent), [d]
    s = float(sae.input_scale)
    gain, shift = torch.ones_like(b_dec), torch.zeros_like(b_dec)  # [d] each: the identity modulation
    if timestep is not None:
        mod = sae.timestep_modulation(int(timestep))  # validates the timestep against the schedule
        gain, shift = mod.gain.to("cpu", torch.float64), mod.shift.to("cpu", torch.float64)
    out = SAELensWeights(
        W_enc=(s * gain)[:, None] * w_enc.t(),  # [d, n]
        b_enc=f64["b_enc"] + (shift + (gain - 1) * b_dec) @ w_enc.t(),  # [n]
        W_dec=f64["W_dec"] / s,  # [n, d]
        b_dec=b_dec / s,  # [d]
        # -inf (never trained) fires every positive pre-activation, as a threshold of 0 does
        threshold=None if sae.spec.selection != "batchtopk"
        else sae.threshold.detach().to("cpu", torch.float64).clamp_min(0.0).expand(sae.spec.n_latents),  # [n]
    )
    return SAELensWeights(**{k: v.to(torch.float32).contiguous() for k, v in out.state_dict().items()})


def saelens_config(sae: SparseAutoencoder, timestep: int | None = None,
                   metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``cfg.json`` of one checkpoint. SAELens drops unknown top-level keys but keeps every key of
    ``metadata``, so our provenance goes there, prefixed ``tide_``; ``metadata`` (e.g. ``model_name``, the
    DiT it reads) is merged last."""
    spec = sae.spec
    architecture = ARCHITECTURES[spec.selection]
    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "tide_variant": spec.variant,
            "tide_input_scale": float(sae.input_scale)}
    for key in ("sae_id", "run_id", "layer", "site"):
        if key in sae.meta:
            meta[f"tide_{key}"] = sae.meta[key]
    if timestep is not None:
        meta.update(tide_timestep=int(timestep), tide_num_train_timesteps=spec.num_train_timesteps)
    meta.update(metadata or {})
    cfg: dict[str, Any] = {
        "architecture": architecture, "d_in": spec.d_in, "d_sae": spec.n_latents, "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,  # the fold keeps b_dec as the input centre (b_enc absorbs the rest)
        "normalize_activations": "none",  # the input scale is folded into the weights
        "reshape_activations": "none",
        "metadata": meta,
    }
    if architecture == "topk":
        # Our decoder rows are unit norm before the fold; rescaling by their norm would change the top k.
        cfg.update(k=spec.k, rescale_acts_by_decoder_norm=False)
    return cfg


def _check_replaceable(path: Path) -> None:
    """Refuse to replace a directory that is not an earlier checkpoint: the write swaps the whole directory."""
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not (path / SAELENS_CONFIG_FILE).exists()):
        raise FileExistsError(f"{path} exists and is not a SAELens checkpoint; exporting there would replace "
                              "it: choose a new or empty directory")


def export_saelens(sae: SparseAutoencoder, out_dir: str | Path, timesteps: Iterable[int] | None = None,
                   metadata: Mapping[str, Any] | None = None) -> list[ExportedCheckpoint]:
    """Write ``sae`` as SAELens checkpoints: ``out_dir`` itself for the unmodulated variants;
    ``out_dir/tNNNN/`` for each of ``timesteps`` for the tide variants. Every checkpoint is folded (so every timestep validated) before any is
    written, and each is written atomically."""
    out_dir = Path(out_dir)
    steps = list(dict.fromkeys(int(t) for t in timesteps or ()))  # distinct, in the given order
    if sae.spec.modulated:
        if not steps:
            raise ValueError(f"a {sae.spec.variant} SAE exports one SAELens checkpoint per diffusion timestep (SAELens has no "
                             "timestep-conditioned SAE): give the timesteps to export")
        targets: list[tuple[Path, int | None]] = [(out_dir / timestep_dirname(t), t) for t in steps]
    elif steps:
        raise ValueError(f"variant {sae.spec.variant!r} has no timestep modulation: export it without timesteps")
    else:
        targets = [(out_dir, None)]
    folded = [(path, t, fold_weights(sae, t)) for path, t in targets]
    for path, _, _ in folded:
        _check_replaceable(path)
    written = []
    for path, t, weights in folded:
        with atomic_directory(path) as tmp:
            cfg = saelens_config(sae, t, metadata)
            (tmp / SAELENS_CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
            save_file(weights.state_dict(), str(tmp / SAELENS_WEIGHTS_FILE))
        written.append(ExportedCheckpoint(path=path, architecture=cfg["architecture"], timestep=t))
    return written
