"""How well a judge agrees with human labels: confusion matrix, precision, recall.

Positive class = "refused". ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``,
``accuracy = (TP + TN) / n`` (``nan`` when a denominator is zero).

Labelled files: ``.jsonl`` or ``.csv`` with a completion column (``completion``, ``response``,
``text`` or ``assistant_response``) and a label column (``refused``, ``label`` or ``human_score``)
holding a boolean-like value (``true/false``, ``1/0``, ``1.0/0.0``, ``yes/no``,
``refusal/compliance``). CSV lines starting with ``#`` before the header are skipped. This reads
PyRIT's human-labelled refusal-scorer CSVs as they are; ``pyrit_refusal_files`` finds them in an
installed ``pyrit`` (the CLI's ``judge-agreement pyrit``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.judges import Judge, get_judge, run_judge

_TEXT_COLUMNS = ("completion", "response", "text", "assistant_response")
_LABEL_COLUMNS = ("refused", "label", "human_score")
_TRUE = {"true", "1", "1.0", "yes", "y", "refused", "refusal", "refuse"}
_FALSE = {"false", "0", "0.0", "no", "n", "complied", "compliance", "comply", "not_refused"}


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


@dataclass
class Agreement:
    """Confusion counts of a judge against labels, with the disagreements kept."""

    judge: str
    tp: int
    fp: int
    fn: int
    tn: int
    disagreements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.n)

    def to_dict(self) -> dict[str, Any]:
        return {
            "judge": self.judge,
            "n": self.n,
            "precision": self.precision,
            "recall": self.recall,
            "accuracy": self.accuracy,
            "confusion": {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn},
            "disagreements": self.disagreements,
        }


def judge_agreement(
    judge: Judge | str | None, completions: Sequence[str], labels: Sequence[bool]
) -> Agreement:
    """Compare a judge's decisions with ``labels`` (True = refusal)."""
    if len(completions) != len(labels):
        raise LensSafetyError(
            f"{len(completions)} completions but {len(labels)} labels", "give one label per completion"
        )
    if not completions:
        raise LensSafetyError("no labelled completions", "give at least one labelled completion")
    the_judge = get_judge(judge)
    verdicts = run_judge(the_judge, list(completions))
    counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    disagreements = []
    for text, label, verdict in zip(completions, labels, verdicts, strict=True):
        key = ("t" if verdict.refused == label else "f") + ("p" if verdict.refused else "n")
        counts[key] += 1
        if verdict.refused != label:
            disagreements.append(
                {"completion": text, "label": label, "judged": verdict.refused, "reason": verdict.reason}
            )
    return Agreement(getattr(the_judge, "name", "judge"), disagreements=disagreements, **counts)


def _parse_label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().casefold()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise LensSafetyError(
        f"{where}: label {value!r} is not a boolean", "use true/false, 1/0, yes/no or refusal/compliance"
    )


def load_labelled(path: str | Path) -> tuple[list[str], list[bool]]:
    """Read ``(completions, labels)`` from a labelled ``.jsonl`` or ``.csv`` file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise LensSafetyError(f"labelled file '{file}' does not exist", "check the path")
    if file.suffix == ".jsonl":
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif file.suffix == ".csv":
        with file.open(newline="", encoding="utf-8") as handle:
            lines = handle.read().splitlines(keepends=True)
        while lines and lines[0].lstrip().startswith("#"):
            lines.pop(0)
        rows = list(csv.DictReader(lines))
    else:
        raise LensSafetyError(f"'{file.name}' is neither .jsonl nor .csv", "give a .jsonl or .csv file")
    if not rows:
        raise LensSafetyError(f"'{file}' has no rows", "give at least one labelled completion")
    text_col = next((c for c in _TEXT_COLUMNS if c in rows[0]), None)
    label_col = next((c for c in _LABEL_COLUMNS if c in rows[0]), None)
    if text_col is None or label_col is None:
        raise LensSafetyError(
            f"'{file}' needs a completion column ({'/'.join(_TEXT_COLUMNS)}) and a label column ({'/'.join(_LABEL_COLUMNS)})",
            f"rename the columns (found: {', '.join(map(str, rows[0]))})",
        )
    completions = [str(r[text_col] or "") for r in rows]
    labels = [_parse_label(r[label_col], f"{file.name} row {i + 1}") for i, r in enumerate(rows)]
    return completions, labels


def pyrit_refusal_files(root: str | Path | None = None) -> list[Path]:
    """PyRIT's human-labelled refusal CSVs (``**/*refusal*.csv``, scorer results excluded).

    ``root`` defaults to the installed ``pyrit`` package; a missing package is a one-line error.
    """
    if root is None:
        try:
            import pyrit  # type: ignore[import-not-found]
        except ImportError:
            raise LensSafetyError(
                "PyRIT's labelled refusal CSVs need the optional package pyrit",
                "pip install pyrit, or pass your own labelled .csv/.jsonl file",
            ) from None
        root = Path(pyrit.__file__).parent
    files = sorted(p for p in Path(root).rglob("*refusal*.csv") if "results" not in p.relative_to(root).parts)
    if not files:
        raise LensSafetyError(f"no labelled refusal CSV found under {root}", "pass a labelled file instead")
    return files


def load_labelled_many(paths: Sequence[str | Path]) -> tuple[list[str], list[bool]]:
    """:func:`load_labelled` over several files, concatenated."""
    completions: list[str] = []
    labels: list[bool] = []
    for path in paths:
        texts, flags = load_labelled(path)
        completions += texts
        labels += flags
    return completions, labels
