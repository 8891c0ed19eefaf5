"""Resuming the DiTs trained here (digits, styled digits) after a kill.

Every ``resume_every`` steps the loop's whole state (weights, EMA weights, optimizer moments, every random
generator it draws from, the loss log) goes to one file beside the checkpoint directory, hidden like the
directory's own temporaries (the writer's, not a reader's): ``models/.styled-digits.resume.pt`` for
``models/styled-digits``. It is written to a temporary name and renamed, so a kill during the write leaves the
previous state. A restarted training loads it when it records the same recipe fingerprint and goes on from
that step; the weights it ends with are the ones an unbroken run gives (tested). The file is removed once the
checkpoint directory is written; a stale one (another recipe) is ignored and replaced.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

RESUME_SUFFIX = ".resume.pt"


def resume_path(checkpoint_dir: str | Path) -> Path:
    """Where a training run writing ``checkpoint_dir`` keeps its state between kills."""
    out = Path(checkpoint_dir)
    return out.with_name(f".{out.name}{RESUME_SUFFIX}")


@dataclass
class LoopProgress:
    """What a training loop carries from step to step besides weights and generators."""

    step: int = 0
    """Optimizer steps done."""
    losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, mean loss since the previous entry), one entry per logging interval."""
    window: list[float] = field(default_factory=list)
    """Losses of the steps since the last entry."""
    seconds_before: float = 0.0
    """Training seconds spent by earlier processes of this run (0 for a run that was never killed)."""
    started: float = field(default_factory=time.perf_counter)
    """perf_counter when this process started training."""

    @property
    def seconds(self) -> float:
        """Training seconds over every process of this run."""
        return self.seconds_before + time.perf_counter() - self.started

    def record(self, step: int, loss: float, log_every: int, total: int) -> bool:
        """Note step ``step``'s loss (0-based); True when it closed a logging interval."""
        self.step = step + 1
        self.window.append(loss)
        if self.step % log_every and self.step != total:
            return False
        self.losses.append((self.step, round(float(np.mean(self.window)), 5)))
        self.window = []
        return True


@dataclass
class Resumable:
    """The state of one training loop that goes to ``path`` every ``every`` steps (``path`` None: never)."""

    path: Path | None
    """The state file (``resume_path`` of the checkpoint directory), or None for a run that does not resume."""
    fingerprint: str
    """The recipe's fingerprint: a state written under another recipe is not resumed."""
    every: int
    """Steps between saves."""
    modules: dict[str, nn.Module]
    """Every network the loop updates, EMA copies included, by a stable name."""
    optimizer: torch.optim.Optimizer
    numpy_rng: np.random.Generator | None = None
    """The loop's numpy generator (batches, styles, captions), if it has one."""
    torch_generator: torch.Generator | None = None
    """The loop's torch generator (timesteps, noise), if it has one."""

    def restore(self, log: Callable[[str], None] | None = None) -> LoopProgress:
        """The saved progress, with weights, optimizer and generators put back; a fresh LoopProgress when
        there is nothing (or nothing of this recipe) to resume."""
        if self.path is None or not self.path.exists():
            return LoopProgress()
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state["fingerprint"] != self.fingerprint:
            if log:
                log(f"{self.path} holds another recipe ({state['fingerprint']} != {self.fingerprint}): starting over")
            return LoopProgress()
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.numpy_rng is not None:
            self.numpy_rng.bit_generator.state = state["numpy_rng"]
        if self.torch_generator is not None:
            self.torch_generator.set_state(state["torch_generator"])
        torch.set_rng_state(state["torch_global"])  # dropout (the T5 encoder) draws from the global generator
        if log:
            log(f"resuming from step {state['step']} ({self.path})")
        return LoopProgress(step=state["step"], losses=[tuple(x) for x in state["losses"]],
                            window=list(state["window"]), seconds_before=state["seconds"])

    def save_if_due(self, progress: LoopProgress, total: int) -> None:
        """Write the state after every ``every`` steps (not after the last: the checkpoint follows)."""
        if self.path is None or progress.step % self.every or progress.step >= total:
            return
        state = {"fingerprint": self.fingerprint, "step": progress.step, "losses": progress.losses,
                 "window": progress.window, "seconds": progress.seconds,
                 "modules": {name: m.state_dict() for name, m in self.modules.items()},
                 "optimizer": self.optimizer.state_dict(), "torch_global": torch.get_rng_state(),
                 "numpy_rng": self.numpy_rng.bit_generator.state if self.numpy_rng is not None else None,
                 "torch_generator": self.torch_generator.get_state() if self.torch_generator is not None else None}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # a kill mid-write leaves the previous state whole
