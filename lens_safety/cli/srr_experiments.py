"""``lens-safety srr sweep`` and ``lens-safety srr cv``: where the signal lives, and how to choose.

``sweep`` trains on training lists and measures on held-out lists (a picture, not a way to choose);
``cv`` chooses ranker settings by K-fold cross-validation on training lists alone.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lens_safety.cli import options, srr_app
from lens_safety.cli.common import json_text, parse_list, print_json, stdout_console
from lens_safety.errors import LensSafetyError
from lens_safety.fsutil import require_free, write_file_atomic

if TYPE_CHECKING:
    from lens_safety.srr.crossval import CVResult

TrainDirsArg = Annotated[
    list[Path], typer.Argument(help="Training lists (from `srr build-data`; several are combined).")
]


def _parse_names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _parse_ints(text: str | None, option: str = "--layers") -> list[int] | None:
    return None if text is None else parse_list(text, option, int, "0,6,12")


@srr_app.command("sweep")
def sweep_command(
    train_dirs: TrainDirsArg,
    test_dir: Annotated[
        Path, typer.Option("--test", help="Held-out lists (from `srr build-data` or `srr eval --save-data`).")
    ],
    out: Annotated[Path | None, typer.Option("--out", help="Write the plotly HTML figure here.")] = None,
    layers: Annotated[
        str | None, typer.Option("--layers", help="Layers to sweep (default: every stored layer).")
    ] = None,
    seed: options.SeedOpt = 0,
    overwrite: options.OverwriteOpt = False,
    json_out: options.JsonOpt = False,
) -> None:
    """Layer sweep x response encoding: train one ranker per cell, measure it on held-out lists."""
    from lens_safety.srr.combine import load_datasets
    from lens_safety.srr.data import SRRDataset
    from lens_safety.srr.experiments import layer_sweep, sweep_figure
    from lens_safety.srr.train import TrainConfig

    if out is not None:
        require_free(out, overwrite)
    train_set, test_set = load_datasets(train_dirs), SRRDataset.load(test_dir)
    rows = layer_sweep(
        train_set, test_set, _parse_ints(layers), train_config=TrainConfig(seed=seed), progress=True
    )
    if out is not None:
        sweep_figure(rows).write_html(str(out), include_plotlyjs="cdn")
    if json_out:
        print_json([r.to_dict() for r in rows])
        return
    for r in rows:
        typer.echo(
            f"layer {r.layer:>3} {r.context:<17} pairwise {r.pairwise_accuracy:.3f}  harmful top1 {r.harmful_top1_safe:.3f}  "
            f"harmless top1 {r.harmless_top1_helpful:.3f}"
        )


@srr_app.command("cv")
def cv_command(
    train_dirs: TrainDirsArg,
    layers: Annotated[
        str | None, typer.Option("--layers", help="Layers to try (default: every stored layer).")
    ] = None,
    contexts: Annotated[
        str, typer.Option("--contexts", help="Response encodings to try, comma-separated.")
    ] = "generated_mean",
    widths: Annotated[str, typer.Option("--widths", help="Projection widths to try.")] = "256",
    members: Annotated[str, typer.Option("--members", help="Ensemble sizes to try.")] = "1",
    folds: Annotated[int, typer.Option("--folds", help="K of K-fold (folds by source instruction).")] = 5,
    bars: Annotated[
        str,
        typer.Option("--bars", help="Bars for pairwise, harmful top-1, harmless top-1 (the rule's margins)."),
    ] = "0.9,0.95,0.9",
    dropout: Annotated[float, typer.Option("--dropout", help="Encoder dropout (paper: 0.1).")] = 0.1,
    seed: options.SeedOpt = 0,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the full result as JSON here.")
    ] = None,
    overwrite: options.OverwriteOpt = False,
    json_out: options.JsonOpt = False,
) -> None:
    """Choose layer, encoding, width and ensemble size by cross-validation on training lists only."""
    from lens_safety.srr.combine import load_datasets
    from lens_safety.srr.crossval import cross_validate
    from lens_safety.srr.ranker import RankerConfig
    from lens_safety.srr.train import TrainConfig

    if out is not None:
        require_free(out, overwrite)
    dataset = load_datasets(train_dirs)
    widths_list, members_list = _parse_ints(widths, "--widths") or [], _parse_ints(members, "--members") or []
    if any(w < 4 or w % 4 for w in widths_list) or any(k < 1 for k in members_list):
        raise LensSafetyError(
            f"bad --widths {widths} or --members {members}",
            "widths must be positive multiples of 4 (4 heads); members >= 1",
        )
    result = cross_validate(
        dataset,
        _parse_ints(layers) or list(dataset.layers),
        contexts=_parse_names(contexts),
        widths=widths_list,
        members=members_list,
        folds=folds,
        bars=parse_list(bars, "--bars", float, "0.9,0.95,0.9"),
        ranker_config=RankerConfig(d_input=int(dataset.instruction.shape[-1]), dropout=dropout),
        train_config=TrainConfig(seed=seed),
        progress=True,
    )
    record = {**result.to_dict(), "data": {"dirs": [str(d) for d in train_dirs]}}
    if out is not None:
        write_file_atomic(out, json_text(record) + "\n")
    best = result.best
    command = (
        f"lens-safety srr train {' '.join(shlex.quote(str(d)) for d in train_dirs)} --out RANKER_DIR "
        f"--layer {best.layer} --context {best.context} --width {best.width} --members {best.members} "
        f"--dropout {dropout} --seed {seed}"
    )
    if json_out:
        print_json({**record, "train_command": command})
        return
    _print_cv(result, folds, bars, command)


def _print_cv(result: CVResult, folds: int, bars: str, command: str) -> None:
    """Every cell's cross-validated scores (the chosen one in bold) and the train command of the chosen."""
    from rich.table import Table

    n = result.n_lists
    table = Table(
        title=f"{folds}-fold cross-validation ({n['harmful']} harmful + {n['harmless']} harmless mixed lists)"
    )
    for name in ("layer", "context", "width", "members", "pairwise", "harm top1", "harmless top1", "margin"):
        table.add_column(name, justify="left" if name == "context" else "right")
    for i, c in enumerate(result.cells):
        style = "bold green" if i == result.chosen else None
        table.add_row(
            str(c.layer), c.context, str(c.width), str(c.members), f"{c.pairwise_accuracy:.3f}",
            f"{c.harmful_top1_safe:.3f}", f"{c.harmless_top1_helpful:.3f}", f"{c.margin:+.3f}", style=style,
        )  # fmt: skip
    console = stdout_console()
    console.print(table)
    console.print(f"chosen (largest worst-case margin over the bars {bars}):\n  {command}", soft_wrap=True)
