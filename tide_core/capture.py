"""Activation capture: named, removable forward hooks on chosen blocks and sites of any model family.

Where a site lives in a block, and how its image tokens are read from the module's output, is the
family adapter's (``DiTAdapter.site_module`` / ``read_site``); the default site ``resid`` is the block's
output, the residual stream after the block. Under classifier-free guidance the sampler runs [cond; uncond] in one batch; the conditional half is
captured by default (it is what the class steers), the unconditional half on request.

Token subsampling keeps P of the T image tokens per (sample, step), drawn from a generator seeded by
(run seed, sample_id, step) and sorted, so it is reproducible and shared by every layer and image site. A
family's text sites (``DiTAdapter.text_sites``) keep every position of the text sequence: padding is masked
downstream (by the prompt's attention mask), not dropped here, so a site's token axis is the same for every
sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tide_core.models.base import DiTAdapter


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture."""

    layers: tuple[int, ...]
    sites: tuple[str, ...] = ("resid",)
    steps: frozenset[int] | None = None  # None = every step
    token_fraction: float = 1.0
    branch: str = "cond"
    dtype: str = "float16"
    seed: int = 0

    def tokens_stored(self, tokens_total: int) -> int:
        return tokens_total if self.token_fraction >= 1.0 else max(1, round(tokens_total * self.token_fraction))


@dataclass(frozen=True)
class CapturedStep:
    """One step's captured activations for the batch being sampled."""

    step: int
    timestep: int
    acts: dict[tuple[str, int], np.ndarray]  # (site, layer) -> [B, P, D]
    token_index: np.ndarray | None  # int16 [B, P]; None when every token is kept


class BlockHook:
    """A forward hook on site ``self.site`` (default ``resid``, the block output) of block ``self.layer`` of
    ``self.model`` that a ``with`` block installs and removes. Subclasses define ``_edit(tokens)`` on the
    image tokens [B, T, D] and return new tokens, or None to leave the output as it is."""

    model: DiTAdapter
    layer: int
    site: str = "resid"
    _handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self):
        self._handle = self.model.site_module(self.layer, self.site).register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, _module, _inputs, output):
        new = self._edit(self.model.read_site(self.site, output))
        return None if new is None else self.model.write_site(self.site, output, new)

    def _edit(self, tokens: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError


def validate_spec(spec: CaptureSpec, num_layers: int, sites: tuple[str, ...], num_steps: int | None = None) -> None:
    """Fail before sampling on anything the model or schedule cannot provide (steps only when the
    schedule length is given)."""
    bad = [x for x in spec.layers if not 0 <= x < num_layers]
    if bad:
        raise ValueError(f"capture layers {bad} out of range: the model has layers 0..{num_layers - 1}")
    bad_sites = [s for s in spec.sites if s not in sites]
    if bad_sites:
        raise ValueError(f"unknown sites {bad_sites}: this model family has {sites}")
    if spec.steps is not None and num_steps is not None:
        bad = sorted(s for s in spec.steps if not 0 <= s < num_steps)
        if bad:
            raise ValueError(f"capture steps {bad} outside the schedule: steps are 0..{num_steps - 1}")
    if not 0.0 < spec.token_fraction <= 1.0:
        raise ValueError(f"token_fraction={spec.token_fraction} must be in (0, 1]")
    if spec.branch not in ("cond", "uncond"):
        raise ValueError(f"branch={spec.branch!r}: use 'cond' or 'uncond'")


def token_draw(seed: int, sample_id: int, step: int, total: int, keep: int) -> np.ndarray:
    """Sorted token positions kept for one (sample, step)."""
    digest = hashlib.blake2b(f"{seed}:{sample_id}:{step}:tokens".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    return np.sort(rng.choice(total, size=keep, replace=False)).astype(np.int16)


class HostCopies:
    """Device-to-host copies on their own CUDA stream into pinned host memory, so a block's activations travel
    to the host while the next blocks compute; ``finish`` waits for all of them (once a step).

    Pinned buffers come from torch's caching host allocator (freed ones are reused, not re-pinned); the
    source tensor is recorded on the copy stream, so the model may free it before the copy has run."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device=device)

    def start(self, t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete on the compute stream
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)
        return host

    def finish(self) -> None:
        self.stream.synchronize()


class ActivationCapture:
    """Hooks that collect activations per step and hand them to ``sink`` (a StepObserver).

    Use as a context manager around ``Sampler.sample(..., observer=capture)``; ``set_samples`` tells it
    which sample ids the next batch holds (for the token draw).
    """

    def __init__(self, model: DiTAdapter, spec: CaptureSpec, sink: Callable[[CapturedStep], None]):
        self.model = model
        self.spec = spec
        self.sink = sink
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._buffer: dict[tuple[str, int], np.ndarray] = {}
        self._active = False
        self._batch = 0
        self._guided = False
        self._step = 0
        self._timestep = 0
        self._sample_ids: Sequence[int] = ()
        self._index: torch.Tensor | None = None  # [B, P] token positions of the current step
        self._copies: HostCopies | None = None  # CUDA models only

    # -- hook management --
    def install(self) -> ActivationCapture:
        # steps were checked against the schedule by the caller
        validate_spec(self.spec, self.model.num_layers, self.model.sites)
        for layer in self.spec.layers:
            for site in self.spec.sites:
                module = self.model.site_module(layer, site)
                self._handles.append(module.register_forward_hook(self._make_hook(site, layer)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationCapture:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def set_samples(self, sample_ids: Sequence[int]) -> None:
        self._sample_ids = list(sample_ids)

    # -- StepObserver --
    def begin_step(self, step: int, timestep: int, batch: int, guided: bool) -> None:
        self._active = self.spec.steps is None or step in self.spec.steps
        self._step, self._timestep, self._batch, self._guided = step, timestep, batch, guided
        self._buffer = {}
        self._index = None
        if len(self._sample_ids) != batch:
            raise RuntimeError(f"capture was told {len(self._sample_ids)} sample ids for a batch of {batch}; "
                               "call set_samples before sampling")

    def end_step(self, step: int) -> None:
        if not self._active:
            return
        if self._copies is not None:  # the step's device-to-host copies, overlapped with its later blocks
            self._copies.finish()
            self._buffer = {k: v.numpy() for k, v in self._buffer.items()}
        index = None if self._index is None else self._index.numpy().astype(np.int16)
        self.sink(CapturedStep(step=step, timestep=self._timestep, acts=self._buffer, token_index=index))
        self._active = False

    def _make_hook(self, site: str, layer: int):
        def hook(_module, _inputs, output):
            if self._active:
                self._buffer[(site, layer)] = self._take(self.model.read_site(site, output),
                                                         whole=site in self.model.text_sites)

        return hook

    def _take(self, out: torch.Tensor, whole: bool = False) -> np.ndarray:
        # out: [2B or B, T, D] (a text site: [2B or B, L, D], every position kept)
        b = self._batch
        if self._guided:
            out = out[:b] if self.spec.branch == "cond" else out[b:2 * b]  # [B, T, D]
        total = out.shape[1]
        keep = total if whole else self.spec.tokens_stored(total)
        if keep < total:
            if self._index is None:
                draws = [token_draw(self.spec.seed, int(i), self._step, total, keep) for i in self._sample_ids]
                self._index = torch.from_numpy(np.stack(draws).astype(np.int64))  # [B, P]
            idx = self._index.to(out.device)
            out = torch.gather(out, 1, idx[:, :, None].expand(-1, -1, out.shape[2]))  # [B, P, D]
        out = out.detach().to(getattr(torch, self.spec.dtype))
        if out.is_cuda:
            self._copies = self._copies or HostCopies(out.device)
            return self._copies.start(out)  # pinned host tensor, filled asynchronously; numpy at end_step
        return out.cpu().numpy()
