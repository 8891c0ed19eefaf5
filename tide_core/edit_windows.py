"""The part of editing that config validation needs, without torch: step windows of the sampling
schedule and the error an impossible edit raises (re-exported by ``tide_core.edit``)."""

from __future__ import annotations

from dataclasses import dataclass

WINDOW_NAMES = ("early", "middle", "late", "all")


class EditError(ValueError):
    """An edit that cannot work; the message names what to change."""


@dataclass(frozen=True)
class StepWindow:
    """Sampling steps an edit is active at, both ends included (step 0 = noisiest)."""

    start: int
    end: int

    @classmethod
    def named(cls, name: str, num_steps: int) -> StepWindow:
        """early / middle / late thirds of the schedule, or all of it."""
        if name not in WINDOW_NAMES:
            raise EditError(f"unknown step window {name!r}: use one of {', '.join(WINDOW_NAMES)} or 'START-END'")
        if name == "all":
            return cls(0, num_steps - 1)
        i = WINDOW_NAMES.index(name)
        edges = [round(num_steps * j / 3) for j in range(4)]
        return cls(edges[i], max(edges[i], edges[i + 1] - 1))

    @classmethod
    def parse(cls, text: str, num_steps: int) -> StepWindow:
        """'early' | 'middle' | 'late' | 'all' | 'START-END' (inclusive) | 'STEP'."""
        text = text.strip()
        if text in WINDOW_NAMES:
            return cls.named(text, num_steps)
        try:
            lo, _, hi = text.partition("-")
            window = cls(int(lo), int(hi) if hi else int(lo))
        except ValueError:
            raise EditError(f"step window {text!r} is not 'early', 'middle', 'late', 'all', 'START-END' "
                            "or a single step") from None
        window.check(num_steps)
        return window

    def check(self, num_steps: int) -> None:
        if not 0 <= self.start <= self.end < num_steps:
            raise EditError(f"step window {self.start}-{self.end} is outside the schedule: sampling has "
                            f"{num_steps} steps, so start <= end must lie in 0..{num_steps - 1}")

    def __contains__(self, step: int) -> bool:
        return self.start <= step <= self.end

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"
