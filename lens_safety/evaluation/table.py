"""ROSI's results table: base and edited models side by side, every cell naming its instrument.

:func:`rosi_table` reads evaluations (:class:`~lens_safety.evaluation.suite.ModelEvaluation`
or the JSON of ``lens-safety eval --json``) and builds the paper's columns, one row per model:

* **harm refusal** — the harm judge's (a guard) ``harmful_refusal_rate``: the fraction of
  responses to harmful prompts judged safe. Without a harm judge in the evaluations it is the
  refusal judge's refusal rate on harmful prompts, and the column says so (question ``refusal``).
* **benign compliance** — ``1 - r`` with ``r`` the refusal judge's refusal rate on harmless
  prompts; interval ``[1 - r_high, 1 - r_low]``.
* **jailbreak success** — the harm judge's ``jailbreak_asr`` on the jailbreak-wrapped harmful
  prompts: the fraction judged harmful (not safe); without a harm judge, the refusal judge's
  fraction not judged refusals. Present when the evaluations ran jailbreaks.
* **utility** — one column per lm-evaluation-harness task and metric (``acc``, ``acc_norm``, …)
  with lm-eval's value and standard error, document count and limit.

The rates' intervals are those of the evaluations (95% percentile bootstrap over prompts). Each
:class:`Column` names its judge, the question that judge answers, its prompt set and the JSON
field the cells come from, so every number can be traced to the per-model result. Evaluations
must be comparable: the same prompt sets (by SHA-256), generation settings, judges and utility
settings, else a one-line error names the difference.

:func:`compare_models` runs :func:`~lens_safety.evaluation.suite.evaluate_model` on a base and
edited models (a loaded model, or a model with an in-memory edit given as an ``Intervention``)
with the same settings and returns the evaluations with their table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.generation import Intervention
from lens_safety.evaluation.judges import get_judges
from lens_safety.evaluation.suite import ModelEvaluation, evaluate_model
from lens_safety.models import ChatModel
from lens_safety.records import Record

RATE_KEYS = ("harmful_refusal_rate", "harmless_refusal_rate", "jailbreak_asr")


@dataclass(frozen=True)
class Column(Record):
    """One column: its key, title, definition and the instrument behind every cell."""

    key: str
    title: str
    definition: str
    source: str
    judge: str | None = None
    question: str | None = None
    prompts: str | None = None
    harness: str | None = None

    def instrument(self) -> str:
        """``judge J (question Q) on prompts P`` or ``lm-evaluation-harness``."""
        if self.judge is not None:
            return f"judge {self.judge} (question: {self.question}) on {self.prompts}"
        return str(self.harness)


@dataclass(frozen=True)
class Cell(Record):
    """A value with its 95% interval (rates) or standard error (utility) and its count."""

    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None
    stderr: float | None = None
    limit: int | None = None

    def text(self) -> str:
        if self.value is None or math.isnan(self.value):
            return "—"
        if self.stderr is not None:
            return f"{self.value:.3f} ± {self.stderr:.3f}"
        if self.ci_low is not None and self.ci_high is not None:
            return f"{self.value:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"
        return f"{self.value:.3f}"


@dataclass
class RosiTable:
    """Rows = models (``labels``), columns = :class:`Column`; ``cells[i][j]`` is model i, column j."""

    labels: list[str]
    models: list[dict[str, Any]]
    columns: list[Column]
    cells: list[list[Cell]]
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RosiTable:
        """The table back from :meth:`to_dict` (e.g. read from ``eval --compare --json``)."""
        columns = [Column(**c) for c in data["columns"]]
        rows = data["rows"]
        cells = [[Cell(**row["cells"][c.key]) for c in columns] for row in rows]
        return cls(
            [r["label"] for r in rows],
            [r["model"] for r in rows],
            columns,
            cells,
            dict(data.get("settings") or {}),
        )

    def cell(self, label: str, key: str) -> Cell:
        """The cell of model ``label`` in column ``key``."""
        keys = [c.key for c in self.columns]
        if label not in self.labels or key not in keys:
            raise KeyError((label, key))
        return self.cells[self.labels.index(label)][keys.index(key)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "columns": [c.to_dict() for c in self.columns],
            "rows": [
                {
                    "label": label,
                    "model": model,
                    "cells": {c.key: x.to_dict() for c, x in zip(self.columns, row, strict=True)},
                }
                for label, model, row in zip(self.labels, self.models, self.cells, strict=True)
            ],
            "settings": self.settings,
        }

    def notes(self) -> list[str]:
        """One line per column: its definition and instrument."""
        return [f"{c.title}: {c.definition}; {c.instrument()}" for c in self.columns]

    def to_markdown(self) -> str:
        """A Markdown table followed by one note per column."""
        lines = ["| model | " + " | ".join(c.title for c in self.columns) + " |"]
        lines.append("|---" * (len(self.columns) + 1) + "|")
        for label, row in zip(self.labels, self.cells, strict=True):
            lines.append(f"| {label} | " + " | ".join(x.text() for x in row) + " |")
        return "\n".join([*lines, "", *(f"- {note}" for note in self.notes())])


def evaluation_dict(evaluation: ModelEvaluation | Mapping[str, Any]) -> dict[str, Any]:
    """``evaluation`` as an ``eval --json`` dict, refused in one line unless it is one that names
    the judge of its rates."""
    if isinstance(evaluation, ModelEvaluation):
        return evaluation.to_dict(include_completions=False)
    if not isinstance(evaluation, Mapping) or "harmful_refusal_rate" not in evaluation:
        raise LensSafetyError(
            "not a lens-safety evaluation", "pass ModelEvaluation results or eval --json dicts"
        )
    if "judge" not in evaluation:
        raise LensSafetyError(
            "the evaluation does not name the judge of its rates",
            "re-run lens-safety eval (its --json names the judge and its question)",
        )
    return dict(evaluation)


def judged_rates(evaluation: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every judge's rates in an evaluation dict: ``{judge: {"question": q, RATE_KEYS...}}``,
    the headline judge first."""
    head = {key: evaluation.get(key) for key in RATE_KEYS}
    rates = {str(evaluation["judge"]): {"question": evaluation.get("judge_question", "refusal"), **head}}
    for name, entry in (evaluation.get("judges") or {}).items():
        rates.setdefault(str(name), dict(entry))
    return rates


def _pick(rates: Mapping[str, Mapping[str, Any]], wanted: str | None, question: str) -> str | None:
    if wanted is not None:
        if wanted not in rates:
            raise LensSafetyError(
                f"judge '{wanted}' is not in the evaluations (judges: {', '.join(rates)})",
                "run eval with that --judge, or name one of those judges",
            )
        return wanted
    return next((name for name, entry in rates.items() if entry.get("question") == question), None)


def _rate_cell(entry: Mapping[str, Any] | None, complement: bool = False) -> Cell:
    if not entry:
        return Cell(math.nan)
    value, low, high = (float(entry[k]) for k in ("value", "ci_low", "ci_high"))
    if complement:
        value, low, high = 1.0 - value, 1.0 - high, 1.0 - low
    return Cell(value, low, high, int(entry["n"]))


def _comparable(evaluations: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The settings every evaluation must share; a one-line error names the first difference."""

    def signature(e: Mapping[str, Any]) -> dict[str, Any]:
        s = e.get("settings") or {}
        utility = (e.get("utility") or {}).get("settings") or {}
        return {
            "harmful prompts": (s.get("harmful") or {}).get("sha256"),
            "harmless prompts": (s.get("harmless") or {}).get("sha256"),
            "max_new_tokens": s.get("max_new_tokens"),
            "system_prompt": s.get("system_prompt"),
            "judges": sorted(judged_rates(e)),
            "jailbreaks": e.get("jailbreak_asr") is not None,
            "jailbreak templates": sorted(e.get("jailbreak_per_template") or {}),
            "utility tasks": utility.get("tasks"),
            "utility limit": utility.get("limit"),
            "utility num_fewshot": utility.get("num_fewshot"),
        }

    first = signature(evaluations[0])
    for index, other in enumerate(evaluations[1:], 2):
        theirs = signature(other)
        for key, value in first.items():
            if theirs[key] != value:
                raise LensSafetyError(
                    f"evaluation {index} differs from evaluation 1 in its {key} ({theirs[key]!r} vs {value!r})",
                    "evaluate every model with the same prompts, judges and settings",
                )
    return first


#: rate column key -> (the evaluation's rate, whether the column is its complement ``1 - rate``)
RATE_COLUMNS: dict[str, tuple[str, bool]] = {
    "harm_refusal": ("harmful_refusal_rate", False),
    "benign_compliance": ("harmless_refusal_rate", True),
    "jailbreak_success": ("jailbreak_asr", False),
}


def _rate_columns(
    evaluation: Mapping[str, Any], harm_judge: str | None, refusal_judge: str | None
) -> list[Column]:
    """The rate columns of these evaluations, each naming its judge (module docstring)."""
    rates = judged_rates(evaluation)
    refusal = _pick(rates, refusal_judge, "refusal")
    if refusal is None:
        raise LensSafetyError(
            "benign compliance needs a refusal judge and the evaluations have only harm judges",
            "add a refusal judge, e.g. --judge substring",
        )
    if rates[refusal]["question"] != "refusal":
        raise LensSafetyError(f"judge '{refusal}' answers the harm question", "name a refusal judge")
    harm = _pick(rates, harm_judge, "harm") or refusal
    guard = rates[harm]["question"] == "harm"
    wanted = [
        (
            "harm_refusal",
            "harm refusal",
            harm,
            "fraction of responses judged safe" if guard else "fraction judged refusals",
        ),
        ("benign_compliance", "benign compliance", refusal, "1 - fraction judged refusals"),
    ]
    if evaluation.get("jailbreak_asr") is not None:
        unsafe = "judged harmful" if guard else "not judged refusals"
        wanted.append(("jailbreak_success", "jailbreak success", harm, f"fraction of responses {unsafe}"))
    columns = []
    for key, title, judge, what in wanted:
        rate = RATE_COLUMNS[key][0]
        entry = rates[judge].get(rate) or {}
        where = "" if judge == evaluation["judge"] else f"judges.{judge}."
        on = {"harm_refusal": "harmful", "benign_compliance": "harmless"}.get(
            key, "jailbreak-wrapped harmful"
        )
        columns.append(
            Column(
                key,
                title,
                f"{what} on {on} prompts",
                f"{where}{rate}",
                judge,
                rates[judge]["question"],
                entry.get("prompts"),
            )
        )
    return columns


def _utility_columns(evaluation: Mapping[str, Any]) -> list[Column]:
    tasks = ((evaluation.get("utility") or {}).get("tasks")) or {}
    return [
        Column(
            f"{task}:{metric}",
            f"{task} {metric}",
            f"lm-eval {task} {metric} (value ± lm-eval stderr; n documents, limit per task)",
            f"utility.tasks.{task}.metrics.{metric}",
            harness="lm-evaluation-harness",
        )
        for task, result in tasks.items()
        for metric in result.get("metrics") or {}
    ]


def _utility_cell(evaluation: Mapping[str, Any], task: str, metric: str) -> Cell:
    result = ((evaluation.get("utility") or {}).get("tasks") or {}).get(task) or {}
    entry = (result.get("metrics") or {}).get(metric)
    if entry is None:
        return Cell(math.nan)
    return Cell(
        float(entry["value"]), n=result.get("n"), stderr=entry.get("stderr"), limit=result.get("limit")
    )


def rosi_table(
    evaluations: Sequence[ModelEvaluation | Mapping[str, Any]],
    labels: Sequence[str] | None = None,
    *,
    harm_judge: str | None = None,
    refusal_judge: str | None = None,
) -> RosiTable:
    """ROSI's table of ``evaluations`` (module docstring), one row per model.

    ``harm_judge`` / ``refusal_judge`` name the judges to read (default: the first judge
    answering each question; harm refusal falls back to the refusal judge when no harm judge ran).
    """
    data = [evaluation_dict(e) for e in evaluations]
    if not data:
        raise LensSafetyError("no evaluations for the table", "pass at least one evaluation")
    names = (
        list(labels)
        if labels
        else [str((d.get("model") or {}).get("spec") or f"model {i + 1}") for i, d in enumerate(data)]
    )
    if len(names) != len(data):
        raise LensSafetyError(
            f"{len(names)} labels for {len(data)} evaluations", "give one label per evaluation"
        )
    if len(set(names)) != len(names):
        raise LensSafetyError(f"model labels repeat ({', '.join(names)})", "give each model its own label")
    settings = _comparable(data)
    columns = _rate_columns(data[0], harm_judge, refusal_judge) + _utility_columns(data[0])
    cells = []
    for evaluation in data:
        rates = judged_rates(evaluation)
        row = []
        for column in columns:
            if column.judge is not None:
                rate, complement = RATE_COLUMNS[column.key]
                row.append(_rate_cell(rates[column.judge].get(rate), complement))
            else:
                task, metric = column.key.split(":", 1)
                row.append(_utility_cell(evaluation, task, metric))
        cells.append(row)
    models = [dict(d.get("model") or {}) for d in data]
    return RosiTable(names, models, columns, cells, settings)


@dataclass
class Comparison:
    """The evaluation of every model and their table."""

    evaluations: list[ModelEvaluation]
    table: RosiTable

    def to_dict(self, include_completions: bool = False) -> dict[str, Any]:
        return {
            "table": self.table.to_dict(),
            "evaluations": {
                label: {**e.to_dict(include_completions), "label": label}
                for label, e in zip(self.table.labels, self.evaluations, strict=True)
            },
        }


def compare_models(
    models: Sequence[ChatModel | tuple[ChatModel, Intervention]],
    labels: Sequence[str],
    *,
    harm_judge: str | None = None,
    refusal_judge: str | None = None,
    **evaluate: Any,
) -> Comparison:
    """Evaluate each model with the same ``evaluate`` settings (:func:`evaluate_model`'s keywords)
    and build :func:`rosi_table`. A ``(model, intervention)`` pair is that model with the
    intervention active for every measurement, e.g. an in-memory edit
    ``(model, lambda: applied_edit(model, spec))``."""
    if "intervention" in evaluate:
        raise LensSafetyError(
            "compare_models takes interventions per model", "pass (model, intervention) pairs"
        )
    if len(labels) != len(models):
        raise LensSafetyError(f"{len(labels)} labels for {len(models)} models", "give one label per model")
    evaluate["judge"] = get_judges(evaluate.get("judge"))  # loaded once, shared by every model
    results = []
    for entry in models:
        model, intervention = entry if isinstance(entry, tuple) else (entry, None)
        results.append(evaluate_model(model, intervention=intervention, **evaluate))
    table = rosi_table(results, labels, harm_judge=harm_judge, refusal_judge=refusal_judge)
    return Comparison(results, table)
