"""The demonstration's prompt sets and its stage measurements (see :mod:`.demonstration`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation import RefusalEvaluation, evaluate_refusal
from lens_safety.organism.demo_results import StageRates
from lens_safety.prompts import PromptSet

if TYPE_CHECKING:
    from lens_safety.models import ChatModel
    from lens_safety.organism.demonstration import DemoSettings


@dataclass
class Prompts:
    """The demonstration's prompt sets: ``(harmful, harmless)`` of each split and extra pair."""

    train: tuple[PromptSet, PromptSet]
    val: tuple[PromptSet, PromptSet]
    test: tuple[PromptSet, PromptSet]
    full: tuple[PromptSet, PromptSet]
    extra: dict[str, tuple[PromptSet, PromptSet]]

    @classmethod
    def load(cls, s: DemoSettings) -> Prompts:
        def capped(spec: str, n: int | None) -> PromptSet:
            prompts = PromptSet.load(spec)
            return prompts if n is None else prompts.head(n)

        def pair(suffix: str, n: int | None) -> tuple[PromptSet, PromptSet]:
            return capped(f"builtin:harmful{suffix}", n), capped(f"builtin:harmless{suffix}", n)

        extra = {f"{h} + {b}": (capped(h, s.limit), capped(b, s.limit)) for h, b in s.heldout}
        return cls(
            pair(":train", s.train_limit if s.train_limit is not None else s.limit),
            pair(":val", s.limit),
            pair(":test", s.limit),
            pair("", s.direction_prompts),
            extra,
        )


def check_blocks(s: DemoSettings, n_layers: int) -> None:
    outside = [b for b in s.blocks or () if not 0 <= b < n_layers]
    if outside:
        raise LensSafetyError(
            f"blocks {outside} are outside the organism's blocks 0..{n_layers - 1}",
            f"use blocks 0..{n_layers - 1}",
        )
    late = [b for b in s.starts or () if not 0 <= b < n_layers - 1] if s.conditional else []
    if late or (s.conditional and s.starts == ()):
        raise LensSafetyError(
            f"conditional-ROSI start blocks {late or '[]'} are outside 0..{n_layers - 2}",
            f"use start blocks 0..{n_layers - 2} (the edit reads up to block {n_layers - 1})",
        )


@dataclass
class Stages:
    """Measures each stage on the test split (and the extra held-out pairs when asked) and the
    wall-clock and process CPU seconds of every step (:meth:`lap`)."""

    settings: DemoSettings
    prompts: Prompts
    progress: bool
    done: list[StageRates] = field(default_factory=list)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    _last: tuple[float, float] = field(default_factory=lambda: (time.perf_counter(), time.process_time()))

    def lap(self, step: str) -> None:
        """Record the seconds since the previous lap under ``step``."""
        now = (time.perf_counter(), time.process_time())
        self.timings[step] = {"wall_s": now[0] - self._last[0], "cpu_s": now[1] - self._last[1]}
        self._last = now

    def measure(self, name: str, model: ChatModel, on_heldout: bool = False) -> StageRates:
        """Refusal on the test split (and the extra held-out pairs), greedy, substring judge; each
        batch's shared chat-template prefix computed once (no hooks are active here)."""

        def rates(harmful: PromptSet, harmless: PromptSet) -> RefusalEvaluation:
            tokens = self.settings.max_new_tokens
            return evaluate_refusal(
                model, harmful, harmless, max_new_tokens=tokens, share_prefix=True, progress=self.progress
            )

        stage = StageRates.from_evaluation(name, rates(*self.prompts.test))
        for label, pair in self.prompts.extra.items() if on_heldout else []:
            stage.add_heldout(label, rates(*pair))
        self.done.append(stage)
        self.lap(f"measure {name}")
        return stage
