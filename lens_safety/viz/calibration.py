"""Plot a calibration sweep: harmful refusal, over-refusal and KL against the swept setting, bounds drawn.

Input is a :class:`~lens_safety.calibration.CalibrationResult` or its ``to_dict()`` (e.g. read back
from an export's ``calibration.json``). For an alpha sweep the x axis is alpha on a log scale (the
unedited baseline, alpha = 0, is drawn as dotted horizontal lines since 0 has no place on a log
axis); for layer or block-range sweeps the x axis lists the points' labels. Refusal rates use the
left axis (0..1), the first-token KL (nats) the right one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go

if TYPE_CHECKING:
    from lens_safety.calibration import CalibrationResult

_COLOURS = {"harmful": "#d62728", "harmless": "#1f77b4", "kl": "#7f7f7f"}


def _as_dict(result: CalibrationResult | Mapping[str, Any]) -> Mapping[str, Any]:
    return result if isinstance(result, Mapping) else result.to_dict()


def calibration_figure(result: CalibrationResult | Mapping[str, Any], title: str | None = None) -> go.Figure:
    """Refusal / over-refusal / KL curve of a sweep, with the three bounds and the chosen point."""
    data = _as_dict(result)
    points, bounds, base = data["points"], data["bounds"], data["baseline"]
    by_alpha = data["parameter"] == "alpha"
    xs = [p["alpha"] for p in points] if by_alpha else [p["label"] for p in points]
    fig = go.Figure()
    series = (
        ("harmful_refusal", "harmful refusal", "harmful", "y"),
        ("harmless_refusal", "harmless refusal (over-refusal)", "harmless", "y"),
        ("harmless_kl", "harmless first-token KL (nats, right axis)", "kl", "y2"),
    )
    for key, name, colour, axis in series:
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=[p[key] for p in points],
                name=name,
                mode="lines+markers",
                line={"color": _COLOURS[colour], "dash": "dot" if axis == "y2" else "solid"},
                yaxis=axis,
                hovertext=[p["label"] for p in points],
            )
        )
    for key, colour in (("harmful_refusal", "harmful"), ("harmless_refusal", "harmless")):
        fig.add_hline(
            y=base[key],
            line={"color": _COLOURS[colour], "dash": "dot", "width": 1},
            annotation_text=f"unedited {key.replace('_', ' ')} {base[key]:.2f}",
            annotation_position="bottom left",
        )
    fig.add_hline(
        y=bounds["target_refusal"],
        line={"color": _COLOURS["harmful"], "dash": "dash"},
        annotation_text=f"target refusal {bounds['target_refusal']:g}",
    )
    limit = data.get("over_refusal_limit", bounds["max_over_refusal"])
    fig.add_hline(
        y=limit,
        line={"color": _COLOURS["harmless"], "dash": "dash"},
        annotation_text=f"max over-refusal {limit:.3g}",
    )
    fig.add_hline(
        y=bounds["max_kl"],
        yref="y2",
        line={"color": _COLOURS["kl"], "dash": "dash"},
        annotation_text=f"max KL {bounds['max_kl']:g}",
        annotation_position="top left",
    )
    chosen = data.get("chosen")
    if chosen is not None:
        fig.add_vline(
            x=chosen["alpha"] if by_alpha else xs.index(chosen["label"]),
            line={"color": "black", "width": 1},
            annotation_text=f"chosen {chosen['label']}",
        )
    heading = title or f"{data['method']} calibration over {data['parameter']}: {data['reason']}"
    fig.update_layout(
        title={"text": heading, "font": {"size": 13}},
        xaxis={
            "title": "alpha" if by_alpha else data["parameter"],
            "type": "log" if by_alpha else "category",
        },
        yaxis={"title": "refusal rate", "range": [-0.02, 1.02]},
        yaxis2={"title": "KL (nats)", "overlaying": "y", "side": "right", "rangemode": "tozero"},
        legend={"orientation": "h", "y": -0.2},
        template="plotly_white",
    )
    return fig
