"""The ``README.md`` model card of an exported edit: what was done, to what, and what was measured."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_FORMULAS = {
    "rosi": "W' = W + alpha * s_hat * w_bar^T, w_bar = mean over the d_model rows of the original W (ROSI)",
    "amplify": "W' = (I + alpha * s_hat s_hat^T) W (projection amplification)",
    "orthogonalize": "W' = (I - s_hat s_hat^T) W (weight orthogonalisation, 'abliteration')",
    "add_bias": "b' = b + coeff * r (activation addition baked into an output bias; alpha = coeff * |r|)",
}


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: Mapping[str, Any]) -> list[str]:
    lines = ["| quantity | value |", "|---|---|"]
    lines += [f"| {key} | {_value(val)} |" for key, val in rows.items()]
    return lines


def _measurement_table(measurements: Mapping[str, Any]) -> list[str]:
    """Rows ``name | before | after`` when values are ``{"before": x, "after": y}``, else ``name | value``."""
    paired = {
        k: v for k, v in measurements.items() if isinstance(v, Mapping) and {"before", "after"} <= v.keys()
    }
    lines: list[str] = []
    if paired:
        lines += ["| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {_value(v['before'])} | {_value(v['after'])} |" for k, v in paired.items()]
    single = {k: v for k, v in measurements.items() if k not in paired}
    if single:
        lines += ["", *_table(single)]
    return lines


def render_model_card(edit: Mapping[str, Any]) -> str:
    """Markdown model card from an ``edit.json`` record (see :func:`lens_safety.export.export_edit`)."""
    method = str(edit["method"])
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
        f"- Formula: `{_FORMULAS.get(method, method)}`, applied to every write vector of the edited modules "
        "(weight columns / Conv1D rows / embedding rows, and biases as `b' = M b`).",
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
            "- APPROXIMATE: some edited writers pass through a post-norm (Gemma 2/3), so the weight edit is "
            "not an exact residual-stream edit."
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
    measurements = edit.get("measurements") or {}
    if measurements:
        lines += ["", "## Measured before / after", "", *_measurement_table(measurements)]
    else:
        lines += [
            "",
            "## Measured before / after",
            "",
            "No behavioural measurement was recorded for this export.",
        ]
    lines += ["", "Full record: `edit.json`.", ""]
    return "\n".join(lines)
