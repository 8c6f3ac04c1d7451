"""A self-contained HTML page comparing evaluated models side by side (plotly, inlined).

Input: evaluation dicts as written by ``lens-safety eval --json`` / :meth:`ModelEvaluation.to_dict`.
The page holds one grouped bar chart per metric family (rates; KL and CE) with the bootstrap
intervals as error bars, a summary table, and a few completions per model for inspection. The
plotly library is embedded, so the file opens offline.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lens_safety.errors import LensSafetyError
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


def _table(evaluations: Sequence[dict[str, Any]], labels: list[str]) -> str:
    head = "".join(f"<th>{html.escape(x)}</th>" for x in ["metric", *labels])
    rows = []
    for key, name in (*RATE_METRICS, *NAT_METRICS):
        cells = []
        for evaluation in evaluations:
            found = _value(evaluation.get(key))
            cells.append("—" if found is None else f"{found[0]:.3f} [{found[1]:.3f}, {found[2]:.3f}]")
        if any(c != "—" for c in cells):
            rows.append(
                f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
            )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _samples(evaluation: dict[str, Any], label: str, per_kind: int) -> str:
    records = evaluation.get("records") or []
    items = []
    for kind in ("harmful", "harmless", "jailbreak"):
        for record in [r for r in records if r.get("kind") == kind][:per_kind]:
            verdict = "refused" if record.get("refused") else "answered"
            items.append(
                f"<tr><td>{kind}</td><td>{html.escape(str(record.get('prompt', '')))}</td>"
                f"<td>{html.escape(str(record.get('completion', '')))}</td><td>{verdict}</td></tr>"
            )
    if not items:
        return ""
    return (
        f"<h3>{html.escape(label)}: sample completions</h3><table><thead><tr><th>kind</th><th>prompt</th>"
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
