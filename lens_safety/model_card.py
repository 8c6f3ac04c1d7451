"""The ``README.md`` model card of an exported edit: what was done, to what, and what was measured.

Every measured rate names its judge, the question the judge answers (``refusal``: the fraction
judged refusals; ``harm``: the fraction judged safe) and its prompt set. Utility benchmarks
(``measurements["utility"]``: lm-evaluation-harness results, one per model or ``before`` /
``after``) list task, metric, value, standard error, document count and limit, and a side-by-side
table (``measurements["table"]``, :class:`~lens_safety.evaluation.table.RosiTable`) is rendered
with its column notes. :func:`record_measurements` adds such entries to an existing export.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lens_safety.edits.methods import EDIT_METHODS
from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.table import RosiTable
from lens_safety.fsutil import write_file_atomic

#: measurement keys that describe the rates rather than being measured values
_RATE_CONTEXT = ("judge", "question", "prompts", "n_test")


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: Mapping[str, Any]) -> list[str]:
    lines = ["| quantity | value |", "|---|---|"]
    lines += [f"| {key} | {_value(val)} |" for key, val in rows.items()]
    return lines


def _prompts_of(key: str, measurements: Mapping[str, Any], entry: Mapping[str, Any]) -> tuple[str, str]:
    """The prompt set and count behind rate ``key`` (``harmful_…`` or ``harmless_…``)."""
    kind = "harmless" if key.startswith("harmless") else "harmful"
    prompts = entry.get("prompts", measurements.get("prompts"))
    name = prompts.get(kind) if isinstance(prompts, Mapping) else prompts
    counts = measurements.get("n_test")
    n = (
        counts[0 if kind == "harmful" else 1]
        if isinstance(counts, list | tuple) and len(counts) == 2
        else "?"
    )
    return (str(name) if name else "not recorded"), str(entry.get("n", n))


def _measurement_table(measurements: Mapping[str, Any]) -> list[str]:
    """Rows ``metric | before | after | judge | question | prompts | n`` for ``{"before", "after"}``
    values, then ``quantity | value`` rows for the rest."""
    paired = {
        k: v for k, v in measurements.items() if isinstance(v, Mapping) and {"before", "after"} <= v.keys()
    }
    paired = {k: v for k, v in paired.items() if k not in ("utility", "table")}
    lines: list[str] = []
    if paired:
        lines += [
            "| metric | before | after | judge | question | prompts | n |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, entry in paired.items():
            judge = entry.get("judge", measurements.get("judge", "not recorded"))
            question = entry.get("question", measurements.get("question", "not recorded"))
            prompts, n = _prompts_of(key, measurements, entry)
            row = [
                key,
                _value(entry["before"]),
                _value(entry["after"]),
                str(judge),
                str(question),
                prompts,
                n,
            ]
            lines.append("| " + " | ".join(row) + " |")
    skip = {*paired, *_RATE_CONTEXT, "utility", "table"} if paired else {"utility", "table"}
    single = {k: v for k, v in measurements.items() if k not in skip}
    if single:
        lines += ["", *_table(single)]
    return lines


def _utility_lines(utility: Mapping[str, Any]) -> list[str]:
    """lm-eval results (one ``UtilityEvaluation.to_dict()`` or ``{"before": …, "after": …}``)."""
    runs = (
        {k: utility[k] for k in ("before", "after")}
        if {"before", "after"} <= utility.keys()
        else {"value": utility}
    )
    names = list(runs)
    lines = [
        "| task | metric | " + " | ".join(f"{n} ± stderr" for n in names) + " | n | limit |",
        "|---|---|" + "---|" * len(names) + "---|---|",
    ]
    first = next(iter(runs.values()))
    for task, result in (first.get("tasks") or {}).items():
        for metric in result.get("metrics") or {}:
            cells = []
            for run in runs.values():
                entry = (((run.get("tasks") or {}).get(task) or {}).get("metrics") or {}).get(metric) or {}
                stderr = entry.get("stderr")
                cells.append(
                    f"{_value(entry.get('value'))}" + (f" ± {stderr:.4g}" if stderr is not None else "")
                )
            lines.append(
                f"| {task} | {metric} | "
                + " | ".join(cells)
                + f" | {result.get('n')} | {result.get('limit')} |"
            )
    settings = first.get("settings") or {}
    lines += [
        "",
        f"Scored by {first.get('harness', 'lm-evaluation-harness')} {settings.get('lm_eval_version') or ''} "
        f"(num_fewshot {settings.get('num_fewshot')}, limit per task {settings.get('limit')}).",
    ]
    return lines


def _measured_sections(measurements: Mapping[str, Any]) -> list[str]:
    if not measurements:
        return [
            "",
            "## Measured before / after",
            "",
            "No behavioural measurement was recorded for this export.",
        ]
    lines = ["", "## Measured before / after", "", *_measurement_table(measurements)]
    if isinstance(measurements.get("utility"), Mapping):
        lines += ["", "## Utility benchmarks", "", *_utility_lines(measurements["utility"])]
    if isinstance(measurements.get("table"), Mapping):
        table = RosiTable.from_dict(measurements["table"])
        lines += ["", "## Side by side (lens-safety eval --compare)", "", table.to_markdown()]
    return lines


def _export_record(export_dir: str | Path, keys: Sequence[str], overwrite: bool) -> dict[str, Any]:
    folder = Path(export_dir)
    record_file = folder / "edit.json"
    if not record_file.is_file():
        raise LensSafetyError(
            f"'{folder}' has no edit.json", "record measurements in a lens-safety export (rosi, ablate, …)"
        )
    record: dict[str, Any] = json.loads(record_file.read_text(encoding="utf-8"))
    taken = [k for k in keys if k in (record.get("measurements") or {})]
    if taken and not overwrite:
        raise LensSafetyError(f"'{folder}' already records '{taken[0]}'", "pass --overwrite to replace it")
    return record


def check_recordable(export_dir: str | Path, keys: Sequence[str], overwrite: bool = False) -> None:
    """Fail early unless :func:`record_measurements` could add ``keys`` to this export."""
    _export_record(export_dir, keys, overwrite)


def record_measurements(
    export_dir: str | Path, entries: Mapping[str, Any], *, overwrite: bool = False
) -> Path:
    """Add ``entries`` to the ``measurements`` of an export's ``edit.json`` and re-render its
    ``README.md`` (each file replaced atomically); an existing key is kept unless ``overwrite``."""
    record = _export_record(export_dir, list(entries), overwrite)
    record.setdefault("measurements", {}).update({k: v for k, v in entries.items()})
    folder = Path(export_dir)
    write_file_atomic(folder / "edit.json", json.dumps(record, indent=2, default=str))
    write_file_atomic(folder / "README.md", render_model_card(record))
    return folder / "README.md"


def render_model_card(edit: Mapping[str, Any]) -> str:
    """Markdown model card from an ``edit.json`` record (see :func:`lens_safety.export.export_edit`)."""
    method = str(edit["method"])
    kind = EDIT_METHODS.get(method)
    formula = method if kind is None else kind.formula
    applied = (
        "applied to the output bias of each edited module"
        if kind is not None and not kind.rank_one
        else "applied to every write vector of the edited modules "
        "(weight columns / Conv1D rows / embedding rows, and biases as `b' = M b`)"
    )
    base = edit.get("base_model", "?")
    verification = edit.get("verification", {})
    lines = [
        "---",
        "tags: [lens-safety, " + method + "]",
        "---",
        "",
        f"# {method} edit of {base}",
        "",
        f"This model is `{base}` (weights SHA-256 `{edit.get('base_weights_sha256', '?')}`) with a rank-one "
        f"weight edit made by lens-safety {edit.get('lens_safety_version', '?')}.",
        "",
        "## What was done",
        "",
        f"- Formula: `{formula}`, {applied}.",
        f"- `s_hat`: unit direction in the raw Hugging Face residual basis (SHA-256 `{edit.get('direction_sha256', '?')}`), "
        f"read at layer {edit.get('layer')}; stored in `direction.safetensors` / `direction.json`.",
        f"- alpha: {_value(edit.get('alpha'))}; targets: {', '.join(edit.get('targets', []))}; "
        f"blocks: {edit.get('layers') if edit.get('layers') is not None else 'all'}; "
        f"{len(edit.get('edited_parameters', []))} tensors changed, every other tensor copied unchanged.",
        f"- Computed in float64 from the original (un-centred) weights and cast once to {edit.get('dtype', '?')}.",
    ]
    if edit.get("untied"):
        lines.append(
            "- The token embedding was edited, so `lm_head` was UNTIED and keeps the original unembedding "
            "(`tie_word_embeddings: false`)."
        )
    if edit.get("exact") is False:
        lines.append(
            "- APPROXIMATE: some edited writers pass through a post-norm (Gemma 2/3) or are joined by a "
            "weightless write, so the weight edit is not an exact residual-stream edit."
        )
    lines += [
        "",
        "## Verification",
        "",
        f"Reloaded with vanilla `transformers.AutoModelForCausalLM.from_pretrained` and compared with the "
        f"in-memory edited model on {verification.get('n_prompts', '?')} chat prompts: max |diff| of "
        f"{verification.get('compared', 'logits')} = {_value(verification.get('max_abs_logit_diff'))} "
        f"(bound {_value(verification.get('bound'))}).",
    ]
    lines += _measured_sections(edit.get("measurements") or {})
    lines += ["", "Full record: `edit.json`.", ""]
    return "\n".join(lines)
