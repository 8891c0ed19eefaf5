"""An SAE checkpoint: a directory with ``cfg.json`` (format, variant, spec, meta) and ``sae.safetensors``
(weights, input scale, dead-latent counters). Written atomically; ``load_checkpoint`` mirrors
``save_checkpoint``. Reached through ``SparseAutoencoder.save`` / ``SparseAutoencoder.load``.

The spec is read with ``SAESpec.model_validate``, so a ``cfg.json`` that lacks a field loads with the
field's default: a spec without ``time_init`` gets identity, the only start such a checkpoint can have had.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from tide_core.files import atomic_directory
from tide_core.sae.spec import SAESpec

if TYPE_CHECKING:
    from tide_core.sae.model import SparseAutoencoder

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
CHECKPOINT_FORMAT = 1


def save_checkpoint(sae: SparseAutoencoder, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``<path>/cfg.json`` + ``<path>/sae.safetensors`` (atomically: ``atomic_directory``)."""
    path = Path(path)
    if meta:
        sae.meta.update(meta)
    with atomic_directory(path) as tmp:
        cfg = {"format": CHECKPOINT_FORMAT, "variant": sae.spec.variant,
               "spec": sae.spec.model_dump(), "meta": sae.meta}
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
    sae.source = str(path)
    return path


class CheckpointError(ValueError):
    """An SAE checkpoint cannot be read as written: the message names the file and how to get a good one."""


REPAIR = "delete the directory and train it again (in a warehouse: `tide run --force sae`)"


def load_checkpoint(cls: type[SparseAutoencoder], path: str | Path,
                    device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Rebuild an SAE of class ``cls`` from a directory written by ``save_checkpoint``. A torn or foreign
    file, or weights whose shapes are not the spec's, is a ``CheckpointError``, never a half-loaded SAE."""
    path = Path(path)
    if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{path} is not an SAE checkpoint: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
        if cfg.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"SAE checkpoint {path} has format {cfg.get('format')}; this code reads "
                             f"format {CHECKPOINT_FORMAT}: retrain or convert it")
        sae = cls(SAESpec.model_validate(cfg["spec"]), meta=cfg.get("meta"))
    except (json.JSONDecodeError, KeyError, TypeError, ValidationError) as err:
        raise CheckpointError(f"{path / CONFIG_FILE} is not a readable SAE config ({type(err).__name__}: "
                              f"{str(err).splitlines()[0]}): {REPAIR}") from err
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as err:  # safetensors raises its own error type for a torn or foreign file
        raise CheckpointError(f"{path / WEIGHTS_FILE} cannot be read ({err}): {REPAIR}") from err
    want = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if want != got:
        wrong = [f"{n}: {got.get(n, 'missing')} (the spec makes {want.get(n, 'no such tensor')})"
                 for n in sorted(want.keys() | got.keys()) if want.get(n) != got.get(n)]
        raise CheckpointError(f"{path / WEIGHTS_FILE} does not fit its spec in {path / CONFIG_FILE}: "
                              f"{'; '.join(wrong)}: {REPAIR}")
    sae.load_state_dict(tensors, strict=True)
    sae.source = str(path)
    return sae.to(device)
