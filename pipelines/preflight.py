"""Preflight: what the config cannot say about the environment, checked in seconds before any work.

Config loading is pure (``tide_core.config``); this step looks at the machine: the model's files (and from
them its depth and sites, against ``capture``), the prompt file of a text-conditional model, the device, a
writable warehouse root with room for the activation store, and a warehouse file no other process holds.
Every problem is one line naming what to change; nothing is written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.project import Project
from pipelines.store_size import StoreEstimate, estimate_store, free_space, human_bytes
from tide_core.models.registry import HUB_IDS, ModelError, family_entry, family_of
from tide_core.prompts import PromptError, read_prompt_file

# A writer holds the file for one transaction (seconds); a process that keeps it longer is not this run's.
LOCK_PROBE_S = 3.0
HUB_PROBE_S = 5.0  # seconds to wait for the Hugging Face hub before calling it unreachable


@dataclass(frozen=True)
class PreflightReport:
    """What the preflight found: the problems (empty when the run can start) and the store's estimate."""

    problems: list[str] = field(default_factory=list)
    store: StoreEstimate | None = None  # None when the token grid needs the model's files
    free: tuple[Path, int] | None = None  # (folder, free bytes) where the store goes; None when remote

    def summary(self) -> str:
        """One line for the CLI: the store's size against the free space."""
        if self.store is None:
            return "the activation store's size is unknown until the model's files are here"
        s = self.store
        need = f"about {human_bytes(s.total_bytes)} ({s.formula()})"
        if s.done_fraction:
            need += f", {human_bytes(s.remaining_bytes)} of it still to write"
        room = f"; {human_bytes(self.free[1])} free at {self.free[0]}" if self.free else ""
        return f"the activation store takes {need}{room}"


def preflight(project: Project) -> list[str]:
    """Problems that would make `tide run` fail later; empty when the run can start."""
    return check(project).problems


def check(project: Project) -> PreflightReport:
    """The preflight with its store estimate (``tide run`` prints it)."""
    from tide_core.models.base import resolve_device  # torch: only when a preflight runs, not at CLI start

    cfg = project.config
    problems: list[str] = []
    store = None
    free = free_space(project) if not _unwritable(project.root) else None
    problems += _prompts(project)
    try:
        family = family_of(cfg.model)
        info = family.describe(cfg.model)
        problems += _sampling(family, cfg)
        if problem := _hub_unavailable(cfg.model.source):
            problems.append(problem)
    except ModelError as err:
        problems.append(str(err))
    else:
        store = estimate_store(project, info)
        if store is not None and free is not None and store.remaining_bytes > free[1]:
            problems.append(_short_of_space(project, store, free))
        bad = [layer for layer in cfg.capture.layers if not 0 <= layer < info.num_layers]
        if bad:
            problems.append(f"capture.layers contains {bad}: model {cfg.model.source!r} has {info.num_layers} "
                            f"layers, so layers must be in 0..{info.num_layers - 1}")
        bad_sites = [s for s in cfg.capture.sites if s not in info.sites]
        if bad_sites:
            problems.append(f"capture.sites contains {bad_sites}: the {info.family} family has sites "
                            f"{list(info.sites)}")
        problems += [p for layer in cfg.capture.layers for site in cfg.capture.sites if site in info.sites
                     and 0 <= layer < info.num_layers and (p := family.site_problem(info.num_layers, layer, site))]
    try:
        resolve_device(cfg.model.device)
    except ModelError as err:
        problems.append(str(err))
    if problem := _unwritable(project.root):
        problems.append(problem)
    if problem := _warehouse_held(project.duckdb_path):
        problems.append(problem)
    return PreflightReport(problems, store, free)


def _hub_unavailable(source: str) -> str | None:
    """Why a hub id cannot be loaded here: not in the local Hugging Face cache, and the hub not reachable
    (HF_HUB_OFFLINE set, or no answer within HUB_PROBE_S). Asked before sampling, so a machine without network
    is told at once, not after the stages before the model's first load."""
    if source not in HUB_IDS or Path(source).expanduser().is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "transformer/config.json"), str):
        return None
    fix = (f"download it where the hub is reachable (`huggingface-cli download {source} --local-dir DIR`), copy "
           "DIR here and set model.source to DIR (or fill this machine's Hugging Face cache)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return f"model.source={source!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {fix}"
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(source, timeout=HUB_PROBE_S)
    except Exception as err:  # any failure to reach it: no route, DNS, proxy, timeout, a gated repo
        return (f"model.source={source!r} is not in the local Hugging Face cache and the hub did not answer "
                f"({type(err).__name__}): {fix}")
    return None


def _short_of_space(project: Project, store: StoreEstimate, free: tuple[Path, int]) -> str:
    c = project.config.capture
    return (f"the activation store needs about {human_bytes(store.remaining_bytes)} ({store.formula()}) but "
            f"{free[0]} has {human_bytes(free[1])} free: capture fewer samples (sampling.num_samples), steps "
            f"(capture.steps), layers (capture.layers) or sites (capture.sites), keep fewer tokens "
            f"(capture.token_fraction = {c.token_fraction:g}; TIDE trains on 1/16), or point warehouse.root "
            "(or warehouse.store_url) at a disk with room")


def _warehouse_held(path: Path) -> str | None:
    """Why the warehouse file cannot be opened: another process holds it (DuckDB admits nobody else while a
    process has it open read-write, readers included), or it is not a DuckDB database."""
    if not path.exists():
        return None
    from storage import WarehouseError, WarehouseLockedError, connect  # duckdb: only when a preflight runs

    try:
        connect(path, read_only=True, timeout_s=LOCK_PROBE_S).close()
    except WarehouseLockedError as err:
        holder = re.search(r"held in (.+?) \(PID (\d+)\)", str(err))
        who = f"process {holder[2]} ({holder[1]})" if holder else "another process"
        return (f"the warehouse {path} is held by {who}: while a process has it open read-write, DuckDB lets no "
                "other open it. Stop that process (another `tide run` on this warehouse, or a DuckDB shell or "
                f"notebook that opened it without -readonly{f'; kill {holder[2]}' if holder else ''}), or wait "
                "for it to finish, then run again")
    except WarehouseError as err:
        return str(err)
    return None


def _sampling(family, cfg) -> list[str]:
    """The scheduler and the guidance the family takes (flow-matching models sample with euler alone; FLUX-
    schnell takes no guidance)."""
    problems = []
    s = cfg.sampling
    if s.scheduler not in family.schedulers:
        problems.append(f"sampling.scheduler={s.scheduler!r}: the {family.family} family samples with "
                        f"{' or '.join(repr(x) for x in family.schedulers)}; set sampling.scheduler to one of them")
    if family.guidance_mode(cfg.model) == "none" and s.guidance_scale != 1.0:
        problems.append(f"sampling.guidance_scale={s.guidance_scale}: model {cfg.model.source!r} takes no guidance "
                        "(e.g. FLUX-schnell); set sampling.guidance_scale = 1")
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
