"""A self-contained HTML page comparing evaluated models side by side (plotly, inlined).

Input: evaluation dicts as written by ``lens-safety eval --json`` / :meth:`ModelEvaluation.to_dict`.
The page holds one grouped bar chart per metric family (rates; KL and CE) with the bootstrap
intervals as error bars, a summary table in which every rate names its judge, the question that
judge answers (``refusal``, or ``harm``: then the rate is the fraction judged safe) and its prompt
set, every further judge's rates, the utility benchmarks (lm-evaluation-harness task, metric,
value, standard error, documents, limit), ROSI's side-by-side table
(:func:`~lens_safety.evaluation.table.rosi_table`) when the evaluations are comparable, and a
few completions per model for inspection. The plotly library is embedded, so the file opens
offline.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.table import evaluation_dict, rosi_table
from lens_safety.fsutil import require_free, write_file_atomic

RATE_METRICS = (
    ("harmful_refusal_rate", "refusal (harmful)"),
    ("harmless_refusal_rate", "over-refusal (harmless)"),
    ("jailbreak_asr", "jailbreak ASR"),
    ("damage_repetition_rate", "repetitive"),
    ("damage_empty_rate", "empty"),
    ("damage_truncated_rate", "truncated"),
)
NAT_METRICS = (
    ("kl_harmless", "KL first token"),
    ("kl_harmless_continuation", "KL continuation"),
    ("ce_benign", "CE benign text"),
)


def load_evaluation(path: str | Path) -> dict[str, Any]:
    """Read one evaluation JSON file (the output of ``lens-safety eval --json``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise LensSafetyError(
            f"evaluation file '{file}' does not exist", "write it with lens-safety eval MODEL --json > FILE"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise LensSafetyError(
            f"'{file}' is not JSON", "write it with lens-safety eval MODEL --json > FILE"
        ) from None
    if not isinstance(data, dict) or "harmful_refusal_rate" not in data:
        raise LensSafetyError(
            f"'{file}' is not a lens-safety evaluation", "write it with lens-safety eval MODEL --json > FILE"
        )
    return data


def load_evaluations(path: str | Path) -> list[dict[str, Any]]:
    """The evaluations in one file: an ``eval --json`` file (one) or an ``eval --compare --json``
    file (each compared model, labelled)."""
    file = Path(path).expanduser()
    try:
        data = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("evaluations"), dict) and "table" in data:
        return [{**e, "label": e.get("label", name)} for name, e in data["evaluations"].items()]
    return [load_evaluation(file)]


def _label(evaluation: dict[str, Any], index: int) -> str:
    model = evaluation.get("model") or {}
    return str(evaluation.get("label") or model.get("spec") or f"model {index + 1}")


def _value(entry: Any) -> tuple[float, float, float] | None:
    if not isinstance(entry, dict) or entry.get("value") is None:
        return None
    value = float(entry["value"])
    if math.isnan(value):
        return None
    return value, float(entry["ci_low"]), float(entry["ci_high"])


def _figure(
    evaluations: Sequence[dict[str, Any]],
    labels: list[str],
    metrics: Sequence[tuple[str, str]],
    title: str,
    y_title: str,
) -> Any:
    import plotly.graph_objects as go

    figure = go.Figure()
    for evaluation, label in zip(evaluations, labels, strict=True):
        names, values, plus, minus = [], [], [], []
        for key, name in metrics:
            found = _value(evaluation.get(key))
            if found is None:
                continue
            value, low, high = found
            names.append(name)
            values.append(value)
            plus.append(max(high - value, 0.0))
            minus.append(max(value - low, 0.0))
        figure.add_trace(
            go.Bar(
                name=label, x=names, y=values, error_y={"type": "data", "array": plus, "arrayminus": minus}
            )
        )
    figure.update_layout(
        title=title, barmode="group", yaxis_title=y_title, template="plotly_white", height=420
    )
    return figure


def _instrument(entry: Any) -> str | None:
    """``judge J (question Q), prompts P`` of a judged rate entry, else ``None``."""
    if not isinstance(entry, dict) or not entry.get("judge"):
        return None
    return f"judge {entry['judge']} (question: {entry.get('question', 'refusal')}), prompts {entry.get('prompts')}"


def _cell(entry: Any) -> str:
    found = _value(entry)
    return "—" if found is None else f"{found[0]:.3f} [{found[1]:.3f}, {found[2]:.3f}]"


def _row(name: str, cells: Sequence[str], instrument: str) -> str:
    items = [name, *cells, instrument]
    return "<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in items) + "</tr>"


def _table(evaluations: Sequence[dict[str, Any]], labels: list[str]) -> str:
    head = "".join(f"<th>{html.escape(x)}</th>" for x in ["metric", *labels, "measured by"])
    rows = []
    for key, name in (*RATE_METRICS, *NAT_METRICS):
        entries = [evaluation.get(key) for evaluation in evaluations]
        cells = [_cell(entry) for entry in entries]
        if all(c == "—" for c in cells):
            continue
        instruments = list(dict.fromkeys(i for i in map(_instrument, entries) if i))
        default = "generation damage check" if key.startswith("damage") else "nats, bootstrap over prompts"
        rows.append(_row(name, cells, " / ".join(instruments) or default))
    judges = list(dict.fromkeys(j for e in evaluations for j in (e.get("judges") or {})))
    for judge in judges:
        for key, name in RATE_METRICS[:3]:
            entries = [((e.get("judges") or {}).get(judge) or {}).get(key) for e in evaluations]
            cells = [_cell(entry) for entry in entries]
            if any(c != "—" for c in cells):
                instrument = next((i for i in map(_instrument, entries) if i), f"judge {judge}")
                rows.append(_row(f"{name} [{judge}]", cells, instrument))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _utility(evaluations: Sequence[dict[str, Any]], labels: list[str]) -> str:
    runs = [(e.get("utility") or {}) for e in evaluations]
    tasks = list(dict.fromkeys(t for run in runs for t in (run.get("tasks") or {})))
    if not tasks:
        return ""
    head = "".join(f"<th>{html.escape(x)}</th>" for x in ["task", "metric", *labels, "n", "limit"])
    rows = []
    for task in tasks:
        results = [(run.get("tasks") or {}).get(task) or {} for run in runs]
        metrics = list(dict.fromkeys(m for r in results for m in (r.get("metrics") or {})))
        for metric in metrics:
            cells = []
            for result in results:
                entry = (result.get("metrics") or {}).get(metric)
                stderr = None if entry is None else entry.get("stderr")
                cells.append(
                    "—"
                    if entry is None
                    else f"{entry['value']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
                )
            counts = " / ".join(str(r.get("n")) for r in results)
            limits = " / ".join(str(r.get("limit")) for r in results)
            items = [task, metric, *cells, counts, limits]
            rows.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in items) + "</tr>")
    versions = ", ".join(sorted({str((r.get("settings") or {}).get("lm_eval_version")) for r in runs if r}))
    return (
        "<h2>Utility benchmarks</h2><p>Scored by lm-evaluation-harness "
        f"{html.escape(versions)} (value ± lm-eval's standard error).</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _side_by_side(evaluations: Sequence[dict[str, Any]], labels: list[str]) -> str:
    if len(evaluations) < 2:
        return ""
    try:
        table = rosi_table(evaluations, labels)
    except LensSafetyError as exc:
        return f"<h2>Side by side (ROSI's columns)</h2><p>Not built: {html.escape(str(exc))}</p>"
    head = "".join(f"<th>{html.escape(x)}</th>" for x in ["model", *(c.title for c in table.columns)])
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in [name, *(c.text() for c in row)]) + "</tr>"
        for name, row in zip(table.labels, table.cells, strict=True)
    )
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in table.notes())
    return (
        f"<h2>Side by side (ROSI's columns)</h2><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody>"
        f"</table><ul>{notes}</ul>"
    )


def _samples(evaluation: dict[str, Any], label: str, per_kind: int) -> str:
    records = evaluation.get("records") or []
    items = []
    harm = evaluation.get("judge_question") == "harm"
    yes, no = ("judged safe", "judged harmful") if harm else ("refused", "answered")
    for kind in ("harmful", "harmless", "jailbreak"):
        for record in [r for r in records if r.get("kind") == kind][:per_kind]:
            verdict = yes if record.get("refused") else no
            items.append(
                f"<tr><td>{kind}</td><td>{html.escape(str(record.get('prompt', '')))}</td>"
                f"<td>{html.escape(str(record.get('completion', '')))}</td><td>{verdict}</td></tr>"
            )
    if not items:
        return ""
    return (
        f"<h3>{html.escape(label)}: sample completions (judge {html.escape(str(evaluation.get('judge')))})</h3><table><thead><tr><th>kind</th><th>prompt</th>"
        f"<th>completion</th><th>judged</th></tr></thead><tbody>{''.join(items)}</tbody></table>"
    )


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:14px}
th{background:#f3f3f3}"""


def render_report(
    evaluations: Sequence[dict[str, Any]],
    labels: Sequence[str] | None = None,
    *,
    title: str = "lens-safety evaluation",
    samples: int = 3,
) -> str:
    """The HTML page (a string) comparing ``evaluations`` side by side."""
    if not evaluations:
        raise LensSafetyError("no evaluations to report", "pass at least one evaluation JSON file")
    names = list(labels) if labels else [_label(e, i) for i, e in enumerate(evaluations)]
    if len(names) != len(evaluations):
        raise LensSafetyError(
            f"{len(names)} labels for {len(evaluations)} evaluations", "give one label per evaluation"
        )
    evaluations = [evaluation_dict(e) for e in evaluations]
    rates = _figure(
        evaluations, names, RATE_METRICS, "Refusal, jailbreak and damage rates (95% bootstrap CI)", "fraction"
    )
    nats = _figure(
        evaluations, names, NAT_METRICS, "KL to reference and cross-entropy (nats, 95% bootstrap CI)", "nats"
    )
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>Models: {', '.join(html.escape(n) for n in names)}</p>",
        rates.to_html(full_html=False, include_plotlyjs=True, div_id="rates"),
        nats.to_html(full_html=False, include_plotlyjs=False, div_id="nats"),
        "<h2>Summary</h2>",
        _table(evaluations, names),
        _utility(evaluations, names),
        _side_by_side(evaluations, names),
        "<h2>Completions</h2>",
        *[_samples(e, n, samples) for e, n in zip(evaluations, names, strict=True)],
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(
    evaluations: Sequence[dict[str, Any]],
    path: str | Path,
    labels: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
    title: str = "lens-safety evaluation",
) -> Path:
    """Render and write the report; refuses to overwrite unless asked, writes atomically."""
    out = Path(path).expanduser()
    require_free(out, overwrite, option="path")
    page = render_report(evaluations, labels, title=title)
    write_file_atomic(out, page)
    return out
