"""Utility benchmarks (MMLU, HellaSwag, ARC, BoolQ, …) through lm-evaluation-harness.

lens-safety does not score benchmarks itself: :func:`evaluate_utility` hands the model (an
exported directory, a hub id, or the in-memory Hugging Face model of a :class:`ChatModel`, edits
and an optional hook intervention included) to lm-evaluation-harness's ``HFLM`` and runs
``lm_eval.simple_evaluate`` on the named tasks. For a multiple-choice task lm-eval scores each
choice by its summed log-likelihood ``sum_t log p(c_t | context, c_<t)`` and ``acc`` is the
fraction of documents whose highest-scoring choice is the target; ``stderr`` is lm-eval's
standard error of that mean. Extra task folders (YAML) are added with ``include_path``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.generation import Intervention
from lens_safety.models import ChatModel
from lens_safety.sources import resolve_spec

#: The ROSI paper's utility tasks (lm-eval task names).
PAPER_TASKS: tuple[str, ...] = ("mmlu", "hellaswag", "arc_easy", "arc_challenge", "boolq")
INSTALL = "pip install 'lens-safety[utility]'"


@dataclass
class UtilityResult:
    """One task's metrics: ``{metric: {"value": v, "stderr": s}}`` (e.g. ``acc``, ``acc_norm``)."""

    task: str
    metrics: dict[str, dict[str, float | None]]
    n: int | None
    limit: int | None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, include_samples: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "metrics": self.metrics, "n": self.n, "limit": self.limit}
        if include_samples:
            out["samples"] = self.samples
        return out


@dataclass
class UtilityEvaluation:
    """Every requested task's result and how they were run."""

    results: list[UtilityResult]
    settings: dict[str, Any]

    def __getitem__(self, task: str) -> UtilityResult:
        for result in self.results:
            if result.task == task:
                return result
        raise KeyError(task)

    def to_dict(self, include_samples: bool = False) -> dict[str, Any]:
        return {
            "harness": "lm-evaluation-harness",
            "settings": self.settings,
            "tasks": {r.task: r.to_dict(include_samples) for r in self.results},
        }


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from a comma list or a sequence (``"paper"`` means :data:`PAPER_TASKS`)."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [part.strip() for item in items for part in item.split(",") if part.strip()]
    names = [n for name in names for n in (PAPER_TASKS if name == "paper" else (name,))]
    if not names:
        raise LensSafetyError("no utility task given", f"name lm-eval tasks, e.g. {','.join(PAPER_TASKS)}")
    return list(dict.fromkeys(names))


def _metrics(entry: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for key, value in entry.items():
        metric, comma, filt = key.partition(",")
        if not comma or "_stderr" in metric or not isinstance(value, int | float):
            continue
        name = metric if filt == "none" else f"{metric},{filt}"
        stderr = entry.get(f"{metric}_stderr,{filt}")
        out[name] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, int | float) else None,
        }
    return out


def _samples(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        scores = [float(r[0]) for r in row.get("filtered_resps", row.get("resps", []))]
        out.append({"doc_id": row.get("doc_id"), "target": row.get("target"), "loglikelihoods": scores})
    return out


def _lm(model: ChatModel | str | Path, batch_size: int, device: str | None) -> tuple[Any, dict[str, Any]]:
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise LensSafetyError("utility benchmarks need the optional package lm-eval", INSTALL) from None
    if isinstance(model, ChatModel):
        lm = HFLM(pretrained=model.hf_model, tokenizer=model.tokenizer, batch_size=batch_size)
        return lm, dict(model.identity())
    path = str(model)
    if not Path(path).is_dir():
        path = str(resolve_spec(path)[0])
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = HFLM(pretrained=path, batch_size=batch_size, device=device, trust_remote_code=False)
    return lm, {"spec": str(model), "path": path}


def evaluate_utility(
    model: ChatModel | str | Path,
    tasks: str | Sequence[str] = PAPER_TASKS,
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    include_path: str | Path | None = None,
    intervention: Intervention | None = None,
    log_samples: bool = False,
    seed: int = 0,
) -> UtilityEvaluation:
    """Run lm-eval ``tasks`` on ``model`` (a :class:`ChatModel`, a directory or a spec).

    ``limit`` caps the documents per task (lm-eval's ``limit``; ``None``: all). With
    ``log_samples`` each result keeps the per-document choice log-likelihoods.
    """
    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise LensSafetyError(f"utility limit must be >= 1, got {limit}", "pass a positive limit")
    lm, identity = _lm(model, batch_size, device)
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise LensSafetyError(
            f"task folder '{include_path}' does not exist", "pass a folder of lm-eval YAML tasks"
        )
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise LensSafetyError(
            f"lm-eval has no task {unknown[0]!r}",
            "use an lm-eval task name (lm-eval ls tasks) or --utility-include",
        )
    with intervention() if intervention is not None else nullcontext():
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            limit=limit,
            num_fewshot=num_fewshot,
            task_manager=manager,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    table = {**out.get("groups", {}), **out["results"]}
    counts = out.get("n-samples", {})
    results = []
    for name in names:
        entry = table.get(name, {})
        n = counts.get(name, {}).get("effective")
        rows = out.get("samples", {}).get(name, []) if log_samples else []
        results.append(UtilityResult(name, _metrics(entry), n, limit, _samples(rows)))
    settings = {
        "model": identity,
        "tasks": names,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": batch_size,
        "seed": seed,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "include_path": str(include_path) if include_path else None,
        "intervention": intervention is not None,
    }
    return UtilityEvaluation(results, settings)
