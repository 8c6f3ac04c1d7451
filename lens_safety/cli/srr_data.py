"""``lens-safety srr relabel``: label stored candidate lists again with another judge.

Sampling and encoding are the slow part of ``srr build-data``; labels are a judge's opinion and
cheap to recompute. The features are reused as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lens_safety.cli import options, srr_app
from lens_safety.cli.common import print_json
from lens_safety.fsutil import require_free


@srr_app.command("relabel")
def relabel_command(
    data_dir: Annotated[Path, typer.Argument(help="Lists from `srr build-data`.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for the relabelled lists.")],
    judge: options.LabelJudgeOpt = "substring-broad",
    overwrite: options.OverwriteOpt = False,
    json_out: options.JsonOpt = False,
) -> None:
    """Re-label every candidate of DATA_DIR with JUDGE (features reused) and write them to OUT."""
    from lens_safety.srr.data import SRRDataset
    from lens_safety.srr.labels import relabel_dataset

    require_free(out, overwrite)
    dataset, summary = relabel_dataset(SRRDataset.load(data_dir), judge)
    dataset.save(out, overwrite=overwrite)
    if json_out:
        print_json(summary)
        return
    for kind in ("harmful", "harmless"):
        typer.echo(
            f"{kind}: {summary[f'flipped_{kind}']} candidate labels changed; mixed lists "
            f"{summary[f'mixed_{kind}_before']} -> {summary[f'mixed_{kind}_after']}"
        )
    typer.echo(f"judge {summary['judge']} -> {out}")
