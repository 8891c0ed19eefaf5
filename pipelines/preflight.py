"""Preflight: what the config cannot say about the environment, checked in seconds before any work.

Config loading is pure (``tide_core.config``); this step looks at the machine: the model's files (and from
them its depth and sites, against ``capture``), the prompt file of a text-conditional model, the device, and
a writable warehouse root. Every problem
is one line naming what to change; nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.project import Project
from tide_core.models.registry import ModelError, family_entry, family_of
from tide_core.prompts import PromptError, read_prompt_file


def preflight(project: Project) -> list[str]:
    """Problems that would make `tide run` fail later; empty when the run can start."""
    from tide_core.models.base import resolve_device  # torch: only when a preflight runs, not at CLI start

    cfg = project.config
    problems: list[str] = []
    problems += _prompts(project)
    try:
        info = family_of(cfg.model).describe(cfg.model)
    except ModelError as err:
        problems.append(str(err))
    else:
        bad = [layer for layer in cfg.capture.layers if not 0 <= layer < info.num_layers]
        if bad:
            problems.append(f"capture.layers contains {bad}: model {cfg.model.source!r} has {info.num_layers} "
                            f"layers, so layers must be in 0..{info.num_layers - 1}")
        bad_sites = [s for s in cfg.capture.sites if s not in info.sites]
        if bad_sites:
            problems.append(f"capture.sites contains {bad_sites}: the {info.family} family has sites "
                            f"{list(info.sites)}")
    try:
        resolve_device(cfg.model.device)
    except ModelError as err:
        problems.append(str(err))
    if problem := _unwritable(project.root):
        problems.append(problem)
    return problems


def _prompts(project: Project) -> list[str]:
    """A text-conditional model needs a readable prompt file; a class-conditional one takes none."""
    cfg = project.config
    try:
        text = family_entry(cfg.model).text
    except ModelError:
        return []  # the family check reports it
    if not text:
        if cfg.sampling.prompts is not None:
            return [f"sampling.prompts is set but model.source={cfg.model.source!r} is class-conditional: remove "
                    "sampling.prompts (or choose a text-conditional model)"]
        return []
    if cfg.sampling.prompts is None:
        return [f"model.source={cfg.model.source!r} is text-conditional: set sampling.prompts to a prompt file "
                "(.txt, one prompt a line; or .csv / .parquet with a 'prompt' column)"]
    try:
        read_prompt_file(cfg.sampling.prompts)
    except PromptError as err:
        return [str(err)]
    return []


def _unwritable(root: Path) -> str | None:
    """Why the warehouse root cannot be written (it is a file, or its nearest existing folder is read-only)."""
    if root.exists() and not root.is_dir():
        return f"warehouse.root={str(root)!r} is a file, not a folder: point warehouse.root at a folder"
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"warehouse.root={str(root)!r} cannot be written ({probe} is read-only): choose a writable folder"
    return None
