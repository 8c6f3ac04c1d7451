"""How well a judge agrees with human labels: confusion matrix, precision, recall, accuracy.

Labels mark one of the two questions a judge can answer (:mod:`lens_safety.evaluation.verdict`):

* **refusal labels** (column ``refused``, ``label`` or ``human_score``): positive = *refused*.
  The judge's positive decision is ``Verdict.refused``: "refused" for a refusal judge, "judged
  safe" for a harm judge (the ROSI reading: a safe answer to a harmful prompt counts as a refusal).
* **harm labels** (column ``harmful`` or ``unsafe``): positive = *harmful*. The judge's positive
  decision is ``Verdict.harmful`` for a harm judge and "not refused" for a refusal judge.

With ``TP``, ``FP``, ``FN``, ``TN`` the confusion counts: ``precision = TP / (TP + FP)``,
``recall = TP / (TP + FN)``, ``accuracy = (TP + TN) / n``, each with its 95% Wilson score
interval (:func:`~lens_safety.evaluation.bootstrap.wilson_interval`; ``nan`` and ``[0, 1]`` when
a denominator is zero).

Labelled files: ``.jsonl`` or ``.csv`` with a completion column (``completion``, ``response``,
``text`` or ``assistant_response``), a label column (above) holding a boolean-like value
(``true/false``, ``1/0``, ``1.0/0.0``, ``yes/no``, ``refusal/compliance``, ``unsafe/safe``) and,
optionally, the prompt of each completion (``prompt``, ``instruction``, ``objective``,
``question`` or ``user_prompt``). Judges that read the prompt (guard models, LLM judges) need that
column. CSV lines starting with ``#`` before the header are skipped. This reads PyRIT's
human-labelled refusal-scorer CSVs as they are; :func:`pyrit_refusal_files` finds them in an
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
from lens_safety.evaluation.bootstrap import Estimate, wilson_interval
from lens_safety.evaluation.judges import (
    QUESTIONS,
    Judge,
    Verdict,
    get_judge,
    judge_needs_prompts,
    judge_question,
    run_judge,
)

_TEXT_COLUMNS = ("completion", "response", "text", "assistant_response")
_LABEL_COLUMNS = {"refusal": ("refused", "label", "human_score"), "harm": ("harmful", "unsafe")}
_PROMPT_COLUMNS = ("prompt", "instruction", "objective", "question", "user_prompt")
_TRUE = {"true", "1", "1.0", "yes", "y", "refused", "refusal", "refuse", "unsafe", "harmful"}
_FALSE = {"false", "0", "0.0", "no", "n", "complied", "compliance", "comply", "not_refused", "safe"}


def _proportion(successes: int, n: int) -> Estimate:
    low, high = wilson_interval(successes, n)
    return Estimate(successes / n if n else math.nan, low, high, n)


def decision_name(judge_asks: str, labels_mark: str) -> str:
    """What the judge's positive decision means when compared with labels marking ``labels_mark``."""
    if labels_mark == "refusal":
        return "refused" if judge_asks == "refusal" else "judged safe"
    return "judged harmful" if judge_asks == "harm" else "not refused"


def positive(verdict: Verdict, labels_mark: str) -> bool:
    """The judge's decision on the labels' positive class (module docstring)."""
    if labels_mark == "refusal":
        return verdict.refused
    return bool(verdict.harmful) if verdict.harmful is not None else not verdict.refused


@dataclass
class Agreement:
    """Confusion counts of a judge against labels, with the disagreements kept.

    ``question`` is the question the judge answers; ``labels`` the one the labels mark (the
    positive class: ``refused`` or ``harmful``); ``decision`` what the judge's positive means.
    """

    judge: str
    tp: int
    fp: int
    fn: int
    tn: int
    disagreements: list[dict[str, Any]] = field(default_factory=list)
    question: str = "refusal"
    labels: str = "refusal"
    with_prompts: bool = False
    source: str | None = None

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def decision(self) -> str:
        return decision_name(self.question, self.labels)

    @property
    def precision_estimate(self) -> Estimate:
        return _proportion(self.tp, self.tp + self.fp)

    @property
    def recall_estimate(self) -> Estimate:
        return _proportion(self.tp, self.tp + self.fn)

    @property
    def accuracy_estimate(self) -> Estimate:
        return _proportion(self.tp + self.tn, self.n)

    @property
    def precision(self) -> float:
        return self.precision_estimate.value

    @property
    def recall(self) -> float:
        return self.recall_estimate.value

    @property
    def accuracy(self) -> float:
        return self.accuracy_estimate.value

    def to_dict(self) -> dict[str, Any]:
        return {
            "judge": self.judge,
            "question": self.question,
            "labels": self.labels,
            "positive": "refused" if self.labels == "refusal" else "harmful",
            "judge_positive": self.decision,
            "with_prompts": self.with_prompts,
            "source": self.source,
            "n": self.n,
            "precision": self.precision,
            "recall": self.recall,
            "accuracy": self.accuracy,
            "intervals": {
                "method": "wilson",
                "precision": self.precision_estimate.to_dict(),
                "recall": self.recall_estimate.to_dict(),
                "accuracy": self.accuracy_estimate.to_dict(),
            },
            "confusion": {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn},
            "disagreements": self.disagreements,
        }


@dataclass
class LabelledSet:
    """Labelled completions: ``labels[i]`` marks ``labels_mark`` (``refusal`` or ``harm``) of
    ``completions[i]``; ``prompts`` is ``None`` when the file has no prompt column."""

    completions: list[str]
    labels: list[bool]
    prompts: list[str] | None = None
    labels_mark: str = "refusal"
    source: str | None = None


def _check_prompts(the_judge: Judge, prompts: Sequence[str] | None, source: str | None) -> None:
    if prompts is None and judge_needs_prompts(the_judge):
        where = f"'{source}'" if source else "the labelled completions"
        raise LensSafetyError(
            f"judge '{the_judge.name}' needs the prompt of each completion and {where} has none",
            f"add a prompt column ({'/'.join(_PROMPT_COLUMNS)}) to every row, or use a judge that reads "
            "completions only (substring)",
        )


def judge_agreement(
    judge: Judge | str | None,
    completions: Sequence[str] | LabelledSet,
    labels: Sequence[bool] | None = None,
    prompts: Sequence[str] | None = None,
    *,
    labels_mark: str = "refusal",
    source: str | None = None,
) -> Agreement:
    """Compare a judge's decisions with ``labels`` (True = the positive class of ``labels_mark``).

    ``completions`` may be a :class:`LabelledSet` (then ``labels``, ``prompts``, ``labels_mark``
    and ``source`` come from it). ``prompts`` go to the judge; a judge that needs them
    (:func:`~lens_safety.evaluation.judges.judge_needs_prompts`) without them is a one-line error.
    """
    if isinstance(completions, LabelledSet):
        data = completions
    else:
        data = LabelledSet(list(completions), list(labels or []), None, labels_mark, source)
        data.prompts = list(prompts) if prompts is not None else None
    check_labels_mark(data.labels_mark)
    if len(data.completions) != len(data.labels):
        raise LensSafetyError(
            f"{len(data.completions)} completions but {len(data.labels)} labels",
            "give one label per completion",
        )
    if not data.completions:
        raise LensSafetyError("no labelled completions", "give at least one labelled completion")
    the_judge = get_judge(judge)
    _check_prompts(the_judge, data.prompts, data.source)
    verdicts = run_judge(the_judge, data.completions, data.prompts)
    counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    disagreements = []
    for i, (text, label, verdict) in enumerate(zip(data.completions, data.labels, verdicts, strict=True)):
        decided = positive(verdict, data.labels_mark)
        counts[("t" if decided == label else "f") + ("p" if decided else "n")] += 1
        if decided != label:
            row = {"completion": text, "label": label, "judged": decided, "reason": verdict.reason}
            if data.prompts is not None:
                row = {"prompt": data.prompts[i], **row}
            disagreements.append(row)
    return Agreement(
        the_judge.name,
        disagreements=disagreements,
        question=judge_question(the_judge),
        labels=data.labels_mark,
        with_prompts=data.prompts is not None,
        source=data.source,
        **counts,
    )


def _parse_label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().casefold()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise LensSafetyError(
        f"{where}: label {value!r} is not a boolean",
        "use true/false, 1/0, yes/no, refusal/compliance or unsafe/safe",
    )


def _rows(file: Path) -> list[dict[str, Any]]:
    if not file.is_file():
        raise LensSafetyError(f"labelled file '{file}' does not exist", "check the path")
    if file.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise LensSafetyError(f"{file.name} line {number} is not JSON", "fix that line") from None
        return rows
    if file.suffix == ".csv":
        with file.open(newline="", encoding="utf-8") as handle:
            lines = handle.read().splitlines(keepends=True)
        while lines and lines[0].lstrip().startswith("#"):
            lines.pop(0)
        return list(csv.DictReader(lines))
    raise LensSafetyError(f"'{file.name}' is neither .jsonl nor .csv", "give a .jsonl or .csv file")


def check_labels_mark(labels_mark: str) -> None:
    """The one-line error for a label kind that is not one of :data:`QUESTIONS`."""
    if labels_mark not in QUESTIONS:
        raise LensSafetyError(
            f"unknown label kind '{labels_mark}'", f"use one of {', '.join(QUESTIONS)} (the CLI's --labels)"
        )


def read_labelled(path: str | Path, labels_mark: str | None = None) -> LabelledSet:
    """Read a labelled ``.jsonl`` / ``.csv`` file (module docstring) into a :class:`LabelledSet`.

    ``labels_mark``: which label column to read (``refusal`` or ``harm``); ``None`` takes the
    refusal column when there is one, else the harm column.
    """
    if labels_mark is not None:
        check_labels_mark(labels_mark)
    file = Path(path).expanduser()
    rows = _rows(file)
    if not rows:
        raise LensSafetyError(f"'{file}' has no rows", "give at least one labelled completion")
    text_col = next((c for c in _TEXT_COLUMNS if c in rows[0]), None)
    marks = [labels_mark] if labels_mark else list(QUESTIONS)
    found = [(m, c) for m in marks for c in _LABEL_COLUMNS.get(m, ()) if c in rows[0]]
    if text_col is None or not found:
        wanted = "/".join(c for m in marks for c in _LABEL_COLUMNS.get(m, ()))
        raise LensSafetyError(
            f"'{file}' needs a completion column ({'/'.join(_TEXT_COLUMNS)}) and a label column ({wanted})",
            f"rename the columns (found: {', '.join(map(str, rows[0]))})",
        )
    mark, label_col = found[0]
    prompt_col = next((c for c in _PROMPT_COLUMNS if c in rows[0]), None)
    prompts = None
    if prompt_col is not None:
        missing = [i + 1 for i, r in enumerate(rows) if not isinstance(r.get(prompt_col), str)]
        if missing:
            raise LensSafetyError(
                f"{file.name} row {missing[0]} has no '{prompt_col}'", "give every row its prompt, or none"
            )
        prompts = [str(r[prompt_col]) for r in rows]
    completions = [str(r.get(text_col) or "") for r in rows]
    labels = [_parse_label(r.get(label_col), f"{file.name} row {i + 1}") for i, r in enumerate(rows)]
    return LabelledSet(completions, labels, prompts, mark, str(file))


def load_labelled(path: str | Path) -> tuple[list[str], list[bool]]:
    """``(completions, labels)`` of a labelled file (:func:`read_labelled` without the prompts)."""
    data = read_labelled(path)
    return data.completions, data.labels


def read_labelled_many(paths: Sequence[str | Path], labels_mark: str | None = None) -> LabelledSet:
    """:func:`read_labelled` over several files, concatenated; prompts are kept only when every
    file has them, and every file must mark the same question."""
    sets = [read_labelled(p, labels_mark) for p in paths]
    if not sets:
        raise LensSafetyError("no labelled files", "pass at least one labelled file")
    marks = {s.labels_mark for s in sets}
    if len(marks) > 1:
        raise LensSafetyError(
            "the labelled files mark different questions (refusal and harm)", "pass --labels refusal or harm"
        )
    prompts = None
    if all(s.prompts is not None for s in sets):
        prompts = [p for s in sets for p in s.prompts or []]
    source = sets[0].source if len(sets) == 1 else f"{len(sets)} files"
    return LabelledSet(
        [c for s in sets for c in s.completions],
        [x for s in sets for x in s.labels],
        prompts,
        marks.pop(),
        source,
    )


def load_labelled_many(paths: Sequence[str | Path]) -> tuple[list[str], list[bool]]:
    """:func:`load_labelled` over several files, concatenated."""
    data = read_labelled_many(paths)
    return data.completions, data.labels


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
