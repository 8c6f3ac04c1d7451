"""``lens-safety judge train`` and ``judge compare``: the learned refusal judge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lens_safety.cli import judge_app, options
from lens_safety.cli.common import print_json, quiet_libraries
from lens_safety.errors import LensSafetyError

#: the judges ``judge compare`` measures by default, the learned one first
DEFAULT_COMPARED = ["learned", "substring", "substring-strict", "substring-broad"]


def _parse_layer_sets(value: str | None) -> tuple[tuple[int, ...], ...] | None:
    if value is None:
        return None
    try:
        sets = tuple(tuple(int(x) for x in part.split("+")) for part in value.split(",") if part.strip())
    except ValueError:
        raise LensSafetyError(
            f"--layers '{value}' is not a list of layer sets", "write e.g. --layers 10 or --layers 6,14,6+14"
        ) from None
    if not sets:
        raise LensSafetyError("--layers is empty", "write e.g. --layers 10")
    return sets


@judge_app.command("train")
def train(
    out: Annotated[
        Path, typer.Option("--out", help="Output directory (learned_judge.safetensors, training.json).")
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Labelled pairs (JSONL with id, prompt, response, label, kind, source, split). "
            "Default: the shipped training file; its test rows are never read.",
        ),
    ] = None,
    reader: Annotated[
        str, typer.Option("--reader", help="Reader model spec whose states are the features.")
    ] = "smollm2",
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            help="Candidate layer sets chosen from on validation, comma-separated, '+' joins "
            "layers of one set (e.g. 6,14,6+14). Default: the shipped judge's candidates.",
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", help="Use only the first N pairs of each class in train and in val."),
    ] = None,
    regularization: Annotated[
        float | None,
        typer.Option(
            "--regularization", help="The probe's inverse L2 strength C (default: chosen by 5-fold CV)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per reader forward pass.")] = 8,
    device: options.DeviceOpt = None,
    overwrite: options.OverwriteOpt = False,
    json: options.JsonOpt = False,
) -> None:
    """Train the learned judge deterministically: with the defaults it reproduces the shipped weights."""
    quiet_libraries()
    from lens_safety.evaluation.judge_training import TrainSettings, train_learned_judge

    settings = TrainSettings(batch_size=batch_size, limit=limit, reader=reader, device=device)
    if regularization is not None:
        if not regularization > 0:
            raise LensSafetyError(
                f"--regularization must be > 0, got {regularization}", "pass e.g. --regularization 10"
            )
        settings.regularization = regularization
    if data is not None:
        settings.data = data
    candidates = _parse_layer_sets(layers)
    if candidates is not None:
        settings.candidates = candidates
    run = train_learned_judge(out, settings, overwrite=overwrite, progress=not json)
    if json:
        print_json(run.to_dict())
        return
    for row in run.selection:
        typer.echo(f"layers {'+'.join(map(str, row['layers'])):<8} val accuracy {row['val_accuracy']:.3f}")
    spec = run.weights.spec
    typer.echo(
        f"chosen layers {list(spec.layers)}, C = {run.weights.info['regularization']:g}, "
        f"calibration a = {run.weights.calibration[0]:.4f}, c = {run.weights.calibration[1]:.4f}; "
        f"{run.n_train} train + {run.n_val} val pairs"
    )
    typer.echo(f"wrote {run.path}")


@judge_app.command("compare")
def compare(
    judges: Annotated[
        list[str],
        typer.Option(
            "--judge",
            help="Judges to compare (repeat); the first is compared with each other one.",
        ),
    ] = DEFAULT_COMPARED,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data", help="Labelled pairs (default: the shipped held-out test split); repeat to join files."
        ),
    ] = None,
    no_prompts: Annotated[
        bool, typer.Option("--no-prompts", help="Judge the responses without their prompts.")
    ] = False,
    json: options.JsonOpt = False,
) -> None:
    """Accuracy, precision and recall (95% Wilson intervals) of several judges on hand-labelled pairs,
    on all of them and on long answers, with the first judge's paired accuracy differences."""
    quiet_libraries()
    from lens_safety.evaluation.judge_data import TEST_FILE, load_pairs
    from lens_safety.evaluation.judge_validation import compare_judges

    files = data or [TEST_FILE]
    pairs = [pair for file in files for pair in load_pairs(file)]
    specs = list(judges) or list(DEFAULT_COMPARED)
    source = ", ".join(f.name for f in files)
    result = compare_judges(specs, pairs, with_prompts=not no_prompts, source=source)
    if json:
        print_json(result.to_dict())
        return
    typer.echo(result.table())
