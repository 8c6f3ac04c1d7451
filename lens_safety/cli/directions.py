"""``lens-safety directions`` and ``lens-safety probe``: find a refusal direction, probe every layer."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lens_safety.cli import app, options
from lens_safety.cli.common import (
    json_text,
    load_cli_model,
    parse_auto_int,
    parse_list,
    print_json,
    stdout_console,
)
from lens_safety.errors import LensSafetyError
from lens_safety.fsutil import require_free, staged_directory

if TYPE_CHECKING:
    from lens_safety.directions.pipeline import DirectionReport
    from lens_safety.models import ChatModel
    from lens_safety.probing import ProbeReport
    from lens_safety.prompts import PromptSet

DirectionsOutOpt = Annotated[
    Path, typer.Option("--out", help="Output directory (direction.safetensors, direction.json, figures/).")
]
MethodOpt = Annotated[str, typer.Option("--method", help="mean-diff (default), pca or probe.")]
SelectedPositionOpt = Annotated[
    str, typer.Option("--position", help="auto (selection) or a negative position.")
]
ScoreLayersOpt = Annotated[
    str | None,
    typer.Option("--score-layers", help="Layers selection scores: 'all' (default) or e.g. 8,10,12."),
]
ScorePositionsOpt = Annotated[
    str,
    typer.Option(
        "--score-positions",
        help="Positions selection scores: -1 (default), 'all' post-instruction, or e.g. -1,-2.",
    ),
]
AblationOpt = Annotated[
    str,
    typer.Option(
        "--ablation", help="Selection's bypass/KL ablation: zero (Arditi) or affine (set to harmless mean)."
    ),
]
FilterTrainOpt = Annotated[
    bool,
    typer.Option("--filter-train", help="Keep only refused harmful / answered harmless training prompts."),
]
NoFiguresOpt = Annotated[bool, typer.Option("--no-figures", help="Skip the HTML figures.")]
ProbePositionOpt = Annotated[int, typer.Option("--position", help="Negative token position to probe.")]
ProbeOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Also write DIR/probe.json and the per-layer figures DIR/figures/probe_accuracy.html, "
        "probe_auroc.html and cosine.html.",
    ),
]
BootstrapOpt = Annotated[
    int, typer.Option("--n-bootstrap", help="Bootstrap resamples for the confidence intervals.")
]


def _parse_ints(value: str | None, option: str) -> list[int] | None:
    """Comma-separated integers; ``None`` / ``all``: every one (``None``)."""
    return None if value is None or value == "all" else parse_list(value, option, int, "-1,-2")


def _load_classes(harmful: str, harmless: str) -> tuple[PromptSet, PromptSet]:
    from lens_safety.evaluation.separation import validate_classes
    from lens_safety.prompts import PromptSet

    harmful_set, harmless_set = PromptSet.load(harmful), PromptSet.load(harmless)
    validate_classes(harmful_set, harmless_set)
    return harmful_set, harmless_set


def _write_figures(
    report: DirectionReport, model: ChatModel, figures: Path, batch_size: int, system_prompt: str | None
) -> list[str]:
    from lens_safety import viz
    from lens_safety.activations import collect_activations

    candidates, direction = report.candidates, report.direction
    written = {
        "direction_norms": viz.direction_norms_figure(candidates),
        "separation": viz.separation_figure(candidates),
        "mean_projections": viz.mean_projections_figure(candidates, direction.position),
        "cosine": viz.cosine_heatmap(
            viz.candidate_cosines(direction.directions),
            title=f"Cosine of candidates across layers (position {direction.position})",
        ),
    }
    if report.selection is not None:
        written["selection"] = viz.selection_scores_figure(report.selection)
    reads = [
        collect_activations(
            model, p, positions=(direction.position,), batch_size=batch_size, system_prompt=system_prompt
        ).tensor[:, :, 0]
        for p in report.heldout
    ]
    written["projection_scatter"] = viz.projection_scatter(
        reads[0], reads[1], list(range(model.n_layers)), direction.directions, direction.layer
    )
    figures.mkdir(parents=True, exist_ok=True)
    for name, fig in written.items():
        viz.figure_html(fig, figures / f"{name}.html")
    return sorted(f"figures/{name}.html" for name in written)


@app.command()
def directions(
    model: options.ModelArg = "smollm2",
    harmful: options.HarmfulOpt = "builtin:harmful",
    harmless: options.HarmlessOpt = "builtin:harmless",
    out: DirectionsOutOpt = Path("direction"),
    method: MethodOpt = "mean-diff",
    layer: options.LayerOpt = "auto",
    position: SelectedPositionOpt = "auto",
    score_layers: ScoreLayersOpt = None,
    score_positions: ScorePositionsOpt = "-1",
    n_val: options.NValOpt = 16,
    ablation: AblationOpt = "zero",
    filter_train: FilterTrainOpt = False,
    system_prompt: options.SystemPromptOpt = None,
    overwrite: options.OverwriteOpt = False,
    no_figures: NoFiguresOpt = False,
    batch_size: options.BatchOpt = 16,
    device: options.DeviceOpt = None,
    dtype: options.DtypeOpt = None,
    no_chat_template: options.NoTemplateOpt = False,
    json: options.JsonOpt = False,
) -> None:
    """Extract candidate refusal directions, select one, write DIR/direction.safetensors, .json and figures."""
    from lens_safety.directions import METHODS, find_direction
    from lens_safety.selection import SelectionConfig

    if method not in METHODS:
        raise LensSafetyError(f"unknown method '{method}'", f"use one of {', '.join(METHODS)}")
    if ablation not in ("zero", "affine"):
        raise LensSafetyError(f"unknown ablation '{ablation}'", "use zero or affine")
    require_free(out, overwrite)
    chosen_layer = parse_auto_int(layer, "--layer")
    chosen_position = parse_auto_int(position, "--position")
    layers_to_score = _parse_ints(score_layers, "--score-layers")
    harmful_set, harmless_set = _load_classes(harmful, harmless)
    loaded = load_cli_model(model, device, dtype, no_chat_template)
    positions_to_score = _parse_ints(score_positions, "--score-positions") or list(
        loaded.chat.post_instruction_positions(system_prompt)
    )
    config = SelectionConfig(
        layers=layers_to_score,
        positions=positions_to_score,
        n_val=n_val,
        batch_size=batch_size,
        ablation="zero" if ablation == "zero" else "affine",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = find_direction(
            loaded,
            harmful_set,
            harmless_set,
            method=method,
            layer=chosen_layer,
            position=chosen_position,
            selection=config,
            system_prompt=system_prompt,
            filter_train=filter_train,
            batch_size=batch_size,
            progress=True,
        )
    with staged_directory(out, overwrite=overwrite) as staging:
        report.direction.save(staging, overwrite=True)
        files = ["direction.safetensors", "direction.json"]
        if not no_figures:
            files += _write_figures(report, loaded, staging / "figures", batch_size, system_prompt)
    if report.selection is not None:
        typer.echo(("warning: " if report.selection.fallback else "") + report.selection.message, err=True)
    from lens_safety.selection import NoRefusalWarning

    for item in caught:  # the selection's own warning was printed just above
        if not issubclass(item.category, NoRefusalWarning):
            typer.echo(f"warning: {item.message}", err=True)
    _print_direction_summary(report, out, files, json)


def _per_layer(report: DirectionReport) -> list[dict[str, Any]]:
    """One row per layer: the candidate's norm, effect size and mean projections (raw HF residual
    basis), and the selection's scores where it scored that layer at the chosen position."""
    d = report.direction
    projections_h, projections_b = d.metadata["harmful_projection"], d.metadata["harmless_projection"]
    scores = (
        {s.layer: s for s in report.selection.scores if s.position == d.position} if report.selection else {}
    )
    per_layer: list[dict[str, Any]] = []
    for layer in range(d.n_layers):
        row: dict[str, Any] = {
            "layer": layer,
            "norm": float(d.directions[layer].norm()),
            "effect_size": d.metadata["effect_size"][layer],
            "harmful_projection": projections_h[layer],
            "harmless_projection": projections_b[layer],
        }
        if layer in scores:
            s = scores[layer]
            row.update(
                {
                    "bypass": s.bypass,
                    "induce": s.induce,
                    "kl": s.kl,
                    "val_separation": s.separation,
                    "val_accuracy": s.accuracy,
                    "passed": s.passed,
                    "rejected": s.rejected,
                }
            )
        per_layer.append(row)
    return per_layer


def _print_direction_summary(report: DirectionReport, out: Path, files: list[str], as_json: bool) -> None:
    d = report.direction
    per_layer = _per_layer(report)
    summary = {
        "out": str(out),
        "files": files,
        "layer": d.layer,
        "position": d.position,
        "method": d.method,
        "heldout_accuracy": report.heldout_accuracy,
        "fallback": None if report.selection is None else report.selection.fallback,
        "selection_message": None if report.selection is None else report.selection.message,
        "per_layer": per_layer,
    }
    if as_json:
        print_json(summary)
        return
    from rich.table import Table

    table = Table(
        title=f"direction: layer {d.layer}, position {d.position}, {d.method}; held-out accuracy {report.heldout_accuracy:.3f}"
    )
    for column in (
        "layer",
        "norm",
        "Cohen's d",
        "val acc",
        "harmful proj",
        "harmless proj",
        "bypass",
        "induce",
        "kl",
        "status",
    ):
        table.add_column(column)
    for row in per_layer:
        status = "" if "passed" not in row else ("passed" if row["passed"] else "; ".join(row["rejected"]))
        cells = [
            row["layer"],
            row["norm"],
            row["effect_size"],
            row.get("val_accuracy"),
            row["harmful_projection"],
            row["harmless_projection"],
            row.get("bypass"),
            row.get("induce"),
            row.get("kl"),
        ]
        table.add_row(
            *[("" if c is None else f"{c:.3g}" if isinstance(c, float) else str(c)) for c in cells], status
        )
    console = stdout_console()
    console.print(table)
    console.print(f"wrote {', '.join(files)} to {out}")


@app.command()
def probe(
    model: options.ModelArg = "smollm2",
    harmful: options.HarmfulOpt = "builtin:harmful",
    harmless: options.HarmlessOpt = "builtin:harmless",
    out: ProbeOutOpt = None,
    position: ProbePositionOpt = -1,
    n_bootstrap: BootstrapOpt = 1000,
    system_prompt: options.SystemPromptOpt = None,
    overwrite: options.OverwriteOpt = False,
    batch_size: options.BatchOpt = 16,
    device: options.DeviceOpt = None,
    dtype: options.DtypeOpt = None,
    no_chat_template: options.NoTemplateOpt = False,
    json: options.JsonOpt = False,
) -> None:
    """Per-layer held-out accuracy and AUROC of a logistic probe and of the mean-difference projection
    (with --out: saved with its per-layer figures)."""
    from lens_safety.probing import probe_layers

    if position >= 0:
        raise LensSafetyError(f"--position must be negative, got {position}", "use e.g. --position -1")
    if out is not None:
        require_free(out, overwrite)
    harmful_set, harmless_set = _load_classes(harmful, harmless)
    loaded = load_cli_model(model, device, dtype, no_chat_template)
    report = probe_layers(
        loaded,
        harmful_set,
        harmless_set,
        position=position,
        n_bootstrap=n_bootstrap,
        system_prompt=system_prompt,
        batch_size=batch_size,
        progress=True,
    )
    if out is not None:
        _save_probe(report, out, overwrite)
    if json:
        print_json(report.to_dict())
    else:
        _print_probe_table(report)
        if out is not None:
            typer.echo(f"wrote probe.json and figures/ (probe_accuracy, probe_auroc, cosine) to {out}")


def _save_probe(report: ProbeReport, out: Path, overwrite: bool) -> None:
    """``out/probe.json`` (strict JSON of the report) and its figures, written whole or not at all."""
    from lens_safety import viz

    with staged_directory(out, overwrite=overwrite) as staging:
        (staging / "probe.json").write_text(json_text(report.to_dict()) + "\n")
        (staging / "figures").mkdir()
        for name, figure in viz.probe_figures(report).items():
            viz.figure_html(figure, staging / "figures" / f"{name}.html")


def _print_probe_table(report: ProbeReport) -> None:
    from rich.table import Table

    table = Table(
        title=f"probe: position {report.position}, train {report.n_train}, held-out {report.n_test}"
    )
    for column in (
        "layer",
        "probe acc [95% CI]",
        "probe AUROC",
        "mean-diff acc [95% CI]",
        "mean-diff AUROC",
        "Cohen's d",
    ):
        table.add_column(column)
    for r in report.layers:
        table.add_row(
            str(r.layer),
            f"{r.probe_accuracy:.3f} [{r.probe_accuracy_ci[0]:.3f}, {r.probe_accuracy_ci[1]:.3f}]",
            f"{r.probe_auroc:.3f}",
            f"{r.mean_diff_accuracy:.3f} [{r.mean_diff_accuracy_ci[0]:.3f}, {r.mean_diff_accuracy_ci[1]:.3f}]",
            f"{r.mean_diff_auroc:.3f}",
            f"{r.effect_size:.2f}",
        )
    stdout_console().print(table)
