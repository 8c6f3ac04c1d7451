"""Results of the organism demonstration: each stage's held-out rates and the whole record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lens_safety.evaluation.metrics import RefusalEvaluation
from lens_safety.pipelines.steps import TEST_JUDGE

if TYPE_CHECKING:
    from lens_safety.calibration import ConditionalCalibration
    from lens_safety.calibration.conditional import ConditionalPoint
    from lens_safety.calibration.results import Choice
    from lens_safety.directions import Direction
    from lens_safety.directions.pipeline import DirectionReport
    from lens_safety.directions.read import ReadDirection
    from lens_safety.export import ExportResult
    from lens_safety.organism.demonstration import DemoSettings
    from lens_safety.pipelines.steps import Pair


@dataclass
class StageRates:
    """Held-out refusal (harmful) and over-refusal (harmless) of one model, with 95% intervals."""

    name: str
    harmful_refusal: float
    harmful_interval: tuple[float, float]
    harmless_refusal: float
    harmless_interval: tuple[float, float]
    examples: dict[str, str] = field(default_factory=dict)
    #: the same rates on extra held-out pairs, keyed ``"<harmful spec> + <harmless spec>"``
    heldout: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``(harmful, harmless)`` numbers of test prompts
    n: tuple[int, int] = (0, 0)

    @classmethod
    def from_evaluation(cls, name: str, evaluation: RefusalEvaluation) -> StageRates:
        h, b = evaluation.harmful, evaluation.harmless
        return cls(
            name,
            h.rate,
            (h.ci_low, h.ci_high),
            b.rate,
            (b.ci_low, b.ci_high),
            {"harmful": h.completions[0][:160], "harmless": b.completions[0][:160]},
            n=(h.n, b.n),
        )

    def add_heldout(self, label: str, evaluation: RefusalEvaluation) -> None:
        h, b = evaluation.harmful, evaluation.harmless
        self.heldout[label] = {
            "harmful_refusal": h.rate,
            "harmful_refused": sum(h.refused),
            "harmful_n": h.n,
            "harmful_interval": (h.ci_low, h.ci_high),
            "harmless_refusal": b.rate,
            "harmless_refused": sum(b.refused),
            "harmless_n": b.n,
            "harmless_interval": (b.ci_low, b.ci_high),
        }

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def line(self) -> str:
        """One line of test-split rates, then one indented line per extra held-out pair."""
        lines = [
            f"{self.name:<12} harmful refusal {self.harmful_refusal:.3f} "
            f"[{self.harmful_interval[0]:.2f}, {self.harmful_interval[1]:.2f}]   "
            f"harmless over-refusal {self.harmless_refusal:.3f} "
            f"[{self.harmless_interval[0]:.2f}, {self.harmless_interval[1]:.2f}]"
        ]
        for label, r in self.heldout.items():
            lines.append(
                f"{'':<12} on {label}: harmful {r['harmful_refused']}/{r['harmful_n']} = "
                f"{r['harmful_refusal']:.3f}, harmless {r['harmless_refused']}/{r['harmless_n']} = "
                f"{r['harmless_refusal']:.3f}"
            )
        return "\n".join(lines)


@dataclass
class Demonstration:
    """Every stage's held-out rates, the direction used and the repair's calibration curve."""

    stages: list[StageRates]
    direction: dict[str, Any]
    #: ROSI's sweep; ``alpha`` is the strength it exported, ``None`` when every point broke a bound
    calibration: dict[str, Any]
    alpha: float | None
    alpha_rule: str
    settings: dict[str, Any]
    conditional: dict[str, Any] | None = None
    #: every export's verification (reloaded with vanilla transformers); ``out`` where it was kept
    exports: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    #: ``{step: {"wall_s": ..., "cpu_s": ...}}`` (process CPU seconds, all threads)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)

    def stage(self, name: str) -> StageRates:
        return next(s for s in self.stages if s.name == name)

    def _label(self, name: str) -> str:
        conditional = self.conditional or {}
        strength = "" if self.alpha is None else f" (alpha {self.alpha:g})"  # None: nothing exported
        return {
            "organism": f"organism ({self.settings['organism']})",
            "abliterated": "abliterated child (direction projected out)",
            "repaired": f"ROSI repair of the child{strength}",
            "conditional": f"conditional-ROSI repair ({conditional.get('point', '')})",
            "base": f"base ({self.settings['base']})",
            "base+rosi": "base + the same ROSI",
            "base+cond": "base + the same conditional ROSI",
        }.get(name, name)

    def _takeaway(self) -> list[str]:
        """One line of what the table shows: the refusals abliteration removed and how many each
        repair brought back, at what over-refusal (empty without those stages)."""
        counts = {
            s.name: (round(s.harmful_refusal * s.n[0]), s.n[0], round(s.harmless_refusal * s.n[1]), s.n[1])
            for s in self.stages
        }
        if not {"organism", "abliterated"} <= set(counts):
            return []
        (o, n, _, _), (a, _, _, _) = counts["organism"], counts["abliterated"]
        line = f"In short: the organism refused {o}/{n} harmful requests, its abliterated child {a}/{n}"
        for name, what in (("repaired", "ROSI's repair"), ("conditional", "conditional ROSI's")):
            if name in counts:
                h, hn, b, bn = counts[name]
                line += f"; {what} {h}/{hn} (and {b}/{bn} harmless)"
        return [line + "."]

    def summary(self) -> str:
        """A few lines a newcomer reads: what was measured on which prompts with which judge, the
        before -> after table, the choices made and where the verified exports are."""
        test = self.settings["test"]
        names = " + ".join(f"{m['n']} prompts of {m.get('source', m.get('name', '?'))}" for m in test)
        d = self.direction
        lines = [
            "ROSI puts refusal back into a model whose safety was removed (here: abliterated).",
            f"Before -> after on held-out test prompts ({names}; no step fitted or calibrated on them),",
            f"greedy, {self.settings['max_new_tokens']} new tokens, a refusal as the {self.settings['judge']} "
            'judge sees it (a refusal phrase such as "I can\'t" or "I\'m sorry"):',
            f"  {'model':<58} {'harmful refused':>17} {'harmless refused':>17}",
        ]
        for s in self.stages:
            h, b = s.n
            lines.append(
                f"  {self._label(s.name):<58} {round(s.harmful_refusal * h):>5}/{h:<3} = {s.harmful_refusal:.2f}"
                f" {round(s.harmless_refusal * b):>5}/{b:<3} = {s.harmless_refusal:.2f}"
            )
        lines += self._takeaway()
        rosi = "ROSI: nothing" if self.alpha is None else f"ROSI alpha {self.alpha:g}"
        lines.append(
            f"direction: block {d['layer']}, position {d['position']} ({d['method']}); "
            f"{rosi} chosen on val ({self.alpha_rule})"
        )
        if self.conditional is not None:
            point = self.conditional["point"] or "nothing chosen"
            lines.append(f"conditional ROSI: {point} ({self.conditional['rule']})")
        for e in self.exports:
            where = e["out"] or "a temporary directory (removed)"
            lines.append(
                f"{e['stage']} export: {where}; reloaded with vanilla transformers, max |logit diff| "
                f"{e['max_abs_logit_diff']:.2g} <= {e['bound']:g}"
            )
        cpu = sum(t["cpu_s"] for t in self.timings.values())
        lines.append(f"took {self.seconds:.0f} s ({cpu:.0f} CPU-seconds); wall / CPU seconds per step:")
        lines.append(
            "  " + "; ".join(f"{k} {t['wall_s']:.0f} / {t['cpu_s']:.0f}" for k, t in self.timings.items())
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": {s.name: s.to_dict() for s in self.stages},
            "direction": self.direction,
            "alpha": self.alpha,
            "alpha_rule": self.alpha_rule,
            "calibration": self.calibration,
            "conditional": self.conditional,
            "settings": self.settings,
            "exports": self.exports,
            "seconds": self.seconds,
            "timings": self.timings,
        }


def verification_record(name: str, exported: ExportResult, kept: bool) -> dict[str, Any]:
    """How an export verified (reloaded with vanilla transformers) and where it was kept, if it was."""
    return {
        "stage": name,
        "out": exported.out_dir if kept else None,
        "max_abs_logit_diff": exported.max_abs_logit_diff,
        "bound": exported.bound,
        "compared": exported.compared,
    }


def conditional_record(
    sweep: ConditionalCalibration, picked: ConditionalPoint, choice: Choice, base_read: ReadDirection | None
) -> dict[str, Any]:
    """The conditional-ROSI repair: its point, edit strength, rule and whole sweep."""
    return {
        "point": f"blocks {picked.read.start}..{picked.read.end - 1}, injection {picked.injection:g}",
        "alpha": picked.spec.alpha,
        "injection": picked.injection,
        "blocks": list(picked.read.blocks),
        "rule": f"{choice.rule}: {sweep.result.reason}",
        "calibration": sweep.to_dict(),
        "base_read_direction": None if base_read is None else base_read.to_dict(),
    }


def not_exported_record(calibration: dict[str, Any], problem: str) -> dict[str, Any]:
    """A conditional-ROSI repair whose sweep had no point inside the bounds: the sweep and why."""
    return {
        "point": None,
        "alpha": None,
        "injection": None,
        "blocks": None,
        "rule": f"not exported: {problem}",
        "calibration": calibration,
        "base_read_direction": None,
    }


def direction_record(direction: Direction, report: DirectionReport | None) -> dict[str, Any]:
    """The direction used: block, position, method and how selection chose it."""
    selection = None if report is None else report.selection
    return {
        "layer": direction.layer,
        "position": direction.position,
        "method": direction.method,
        "heldout_accuracy": None if report is None else report.heldout_accuracy,
        "selection_rule": selection.rule if selection else None,
        "selection_message": selection.message if selection else None,
    }


def settings_record(s: DemoSettings, test: Pair, val: Pair, extra: dict[str, Pair]) -> dict[str, Any]:
    """What the demonstration measured on (prompt sets, judge, tokens) and with which settings."""
    return {
        "organism": s.organism_spec,
        "base": s.base_spec,
        "test": [p.metadata() for p in test],
        "heldout": {label: [p.metadata() for p in pair] for label, pair in extra.items()},
        "val": [p.metadata() for p in val],
        "max_new_tokens": s.max_new_tokens,
        "judge": TEST_JUDGE,
        "blocks": None if s.blocks is None else list(s.blocks),
        "targets": None if s.targets is None else list(s.targets),
        "conditional": {"starts": s.starts, "shrinkage": s.shrinkage, "refine": s.refine}
        if s.conditional
        else None,
        "demo": s.to_dict(),
    }
