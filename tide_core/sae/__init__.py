"""Sparse autoencoders on DiT activations: TIDE (timestep-modulated TopK), plain TopK and ReLU + L1.

Read in this order:

* ``spec.py``: the settings: ``SAEDesign`` (architecture and loss, what a run config holds), ``SAESpec``
  (a design bound to its activations' width, variant and schedule: what ``cfg.json`` stores) and
  ``SAETrainConfig``.
* ``sparse.py``: the custom autograd functions that make TopK training touch only the selected latents.
* ``model.py``: ``SparseAutoencoder``, its loss and the decoder-norm recipe; ``outputs.py``: what a
  forward pass and the loss return; ``checkpoint.py``: save / load; ``export.py``: SAELens checkpoints.
* ``batches.py``: ``TokenBatch`` and the stream helpers; ``train.py``: the resumable trainer;
  ``metrics.py``: per-step evaluation.

The compiled top-k and pair grouping come from ``tide_core.kernels``.

Names load on first use (``from tide_core.sae import SparseAutoencoder`` works as usual): the run config
embeds ``SAEDesign`` and ``SAETrainConfig`` from ``spec``, and the Dagster definitions that read the config
must not import torch, which every other module here does.
"""

from __future__ import annotations

import importlib
from typing import Any

# The public names, by the module that defines them: the one list of the package's API.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "tide_core.sae.spec": ("SAEDesign", "SAESpec", "SAETrainConfig", "VARIANTS", "TOPK_VARIANTS", "Variant",
                           "BATCH_VARIANTS", "MODULATED_VARIANTS", "TimeInit"),
    "tide_core.sae.batches": ("TokenBatch", "rebatch", "skip_tokens"),
    "tide_core.sae.checkpoint": ("CHECKPOINT_FORMAT", "CONFIG_FILE", "WEIGHTS_FILE"),
    "tide_core.sae.export": ("ExportedCheckpoint", "SAELensWeights", "export_saelens", "fold_weights"),
    "tide_core.sae.metrics": ("DENSE_THRESHOLD", "EvalResult", "StepMetrics", "evaluate"),
    "tide_core.sae.model": ("Modulation", "SparseAutoencoder", "geometric_median", "timestep_embedding"),
    "tide_core.sae.outputs": ("SAELoss", "SAEOutput"),
    "tide_core.sae.sparse": ("SparseLatents",),
    "tide_core.sae.train": ("SAETrainer", "TrainLog", "TrainResult", "lr_at", "train_saes"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'tide_core.sae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
