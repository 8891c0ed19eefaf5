"""One run context per stage call: the project, its warehouse and store, and the model, built once.

Stages take a ``RunContext`` instead of building ``Warehouse(...)``, opening the store or loading the model
themselves. The loaded model is also kept per process for the config that loaded it, so the assets of one
``tide run`` (one process) load the DiT once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from pipelines.project import Project
from storage import ActivationStore, Warehouse
from tide_core.models.registry import family_of
from tide_core.prompts import PromptSet, read_prompt_file

if TYPE_CHECKING:
    from tide_core.models.base import DiTAdapter, Judge
    from tide_core.sampling import Sampler

Log = Callable[[str], None]
_MODELS: dict[str, DiTAdapter] = {}  # model config + weights identity -> loaded model


@dataclass
class RunContext:
    """What a stage needs, made on first use."""

    project: Project
    log: Log = print
    _store: ActivationStore | None = field(default=None, repr=False)

    @property
    def config(self):
        return self.project.config

    @cached_property
    def warehouse(self) -> Warehouse:
        return Warehouse(self.project.duckdb_path)

    def store(self) -> ActivationStore:
        """The activation store, opened read-only once (StoreError when it does not exist yet)."""
        if self._store is None:
            self._store = ActivationStore.open(self.project.store_url, mode="r")
        return self._store

    @cached_property
    def family(self) -> type[DiTAdapter]:
        return family_of(self.config.model)

    @cached_property
    def prompts(self) -> PromptSet | None:
        """The run's prompts (sampling.prompts), None for a class-conditional run."""
        path = self.config.sampling.prompts
        return None if path is None else read_prompt_file(path)

    @property
    def model(self) -> DiTAdapter:
        """The configured model with its weights (and, text-conditional, its embedded prompts), loaded once per
        process, config, weights and prompt file (a retrained checkpoint has another fingerprint)."""
        s = self.config.sampling
        key = "|".join([self.config.model.model_dump_json(), self.family.fingerprint_of(self.config.model),
                        self.prompts.sha256 if self.prompts else "", s.negative_prompt])
        if key not in _MODELS:
            _MODELS.clear()  # a process runs one config at a time: keep one model, not every one it saw
            _MODELS[key] = self.family.load(self.config.model, self.prompts, s.negative_prompt)
        return _MODELS[key]

    def sampler(self, cfg_renorm: float | None = None, seed_offset: int = 0) -> Sampler:
        """The run's sampler (scheduler, steps, guidance, seed): sample ids give the run's images."""
        from tide_core.sampling import Sampler  # here, not above: the Dagster definitions import this module

        s = self.config.sampling
        return Sampler(self.model, s.scheduler, s.num_steps, s.guidance_scale, s.seed + seed_offset,
                       cfg_renorm=cfg_renorm)

    @cached_property
    def judge(self) -> Judge | None:
        """The family's judge, if it has one and it is trained (None otherwise)."""
        judge_class = self.family.judge_class
        if judge_class is None or not (self.project.judge_dir / "judge.json").exists():
            return None
        return judge_class.load(self.project.judge_dir)

