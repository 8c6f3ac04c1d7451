"""``lens-safety conditional-rosi``: refusal injected in proportion to a harmfulness read direction.

Conditional ROSI edits every attention/MLP writer of blocks ``start .. end - 1`` to
``W' = (I + alpha s_hat g^T) W`` (:func:`~lens_safety.edits.conditional_rosi`): the refusal
direction ``s_hat`` is written in proportion to what the block writes along ``g``, a read direction
estimated on the TRAIN split that separates harmful from harmless prompts and is orthogonal to
``s_hat`` and to the harmless mean (so harmless prompts get, on average, nothing). Unlike
``lens-safety rosi`` (``W + alpha s_hat w_bar^T``, a harm-blind bias) it can restore refusal on an
abliterated model without refusing everything.

Injections are given in units of the refusal direction's gap: the difference of the harmful and
harmless mean projections on ``s_hat`` at the direction's block, as recorded when the direction was
fitted (on the parent, when repairing an abliterated child, whose residual has no ``s_hat``
component left; measured on the train split when the direction records none), so ``1`` adds to
the mean harmful prompt about as much refusal as separates the classes. ``--start auto`` /
``--injection auto`` sweep ``--starts`` x ``--injections`` on the VAL split, then ``--refine``
rounds of bisection between neighbouring injections where refusal crosses the target but
over-refusal or KL breaks its bound; the point meeting every bound with the least over-refusal is
exported. The TEST split measures before / after.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from lens_safety.cli import app
from lens_safety.cli.common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    TemplateBlindOpt,
    load_cli_model,
    parse_numbers,
    parse_prompt_sets,
)
from lens_safety.cli.rosi import (
    DirectionOpt,
    HarmfulOpt,
    HarmlessOpt,
    LayerOpt,
    MaxKlOpt,
    NTestOpt,
    NTrainOpt,
    NValOpt,
    OverwriteOpt,
    TargetRefusalOpt,
    TokensOpt,
    before_after,
    calibration_files,
    check_out,
    load_splits,
    obtain_direction,
    parse_layer,
    print_export_summary,
)
from lens_safety.errors import LensSafetyError

#: Injections swept by default, in gaps (see the module docstring).
DEFAULT_RELATIVE_INJECTIONS = (0.75, 1.0, 1.5, 2.0)


def default_starts(n_layers: int) -> list[int]:
    """First edited blocks swept by default: about a third, a half and two thirds of the depth."""
    return sorted({min(max(1, round(n_layers * f)), n_layers - 2) for f in (1 / 3, 1 / 2, 2 / 3)})


def resolve_blocks(start: str, starts: str | None, end: int | None, n_layers: int) -> tuple[list[int], int]:
    """``(start blocks to sweep, end)``; checked against the model's depth."""
    end = n_layers - 1 if end is None else end
    if start != "auto":
        candidates = parse_numbers(start, "--start", "15", integer=True)
        if len(candidates) != 1:
            raise LensSafetyError(
                f"--start must be 'auto' or one block, got '{start}'", "pass e.g. --start 15"
            )
    elif starts is not None:
        candidates = parse_numbers(starts, "--starts", "10,15,20", integer=True)
    else:
        candidates = [float(b) for b in default_starts(n_layers)]
    blocks = sorted({int(b) for b in candidates})
    if not 0 < end <= n_layers or any(b >= end for b in blocks):
        raise LensSafetyError(
            f"edited blocks start {blocks} .. end {end} are not 0 <= start < end <= {n_layers}",
            f"pick start blocks below --end (default {n_layers - 1}) and --end <= {n_layers}",
        )
    return blocks, end


@app.command("conditional-rosi")
def conditional_rosi_cmd(
    model: ModelArg = "smollm2",
    out: Annotated[Path, typer.Option("--out", help="Output directory of the edited model.")] = Path(
        "conditional-rosi-model"
    ),
    direction: DirectionOpt = None,
    harmful: HarmfulOpt = "builtin:harmful",
    harmless: HarmlessOpt = "builtin:harmless",
    layer: LayerOpt = "auto",
    start: Annotated[
        str, typer.Option("--start", help="First edited block: auto (swept on val) or a block index.")
    ] = "auto",
    starts: Annotated[
        str | None,
        typer.Option(
            "--starts", help="First blocks swept by --start auto (default: ~1/3, 1/2, 2/3 of depth)."
        ),
    ] = None,
    end: Annotated[
        int | None,
        typer.Option("--end", help="One past the last edited block (default n_layers - 1; n_layers: all)."),
    ] = None,
    injection: Annotated[
        str,
        typer.Option("--injection", help="Injection in gaps: auto (swept on val) or a number > 0."),
    ] = "auto",
    injections: Annotated[
        str | None,
        typer.Option(
            "--injections", help="Injections (gaps) swept by --injection auto (default 0.75,1,1.5,2)."
        ),
    ] = None,
    shrinkage: Annotated[
        float,
        typer.Option(
            "--shrinkage", min=0.0, help="Shrinkage-LDA ridge of the read direction (0: the mean difference)."
        ),
    ] = 1.0,
    template: TemplateBlindOpt = False,
    read_harmless: Annotated[
        str,
        typer.Option(
            "--read-harmless",
            help="Benign prompt sets (comma-separated) added to the harmless train prompts of the read "
            "directions, e.g. look-alikes of harmful requests (default none).",
        ),
    ] = "none",
    refine: Annotated[
        int,
        typer.Option(
            "--refine", min=0, help="Bisection rounds on the injection after the grid (--injection auto)."
        ),
    ] = 2,
    target_refusal: TargetRefusalOpt = 0.85,
    max_over_refusal: Annotated[
        float,
        typer.Option(
            "--max-over-refusal",
            help="Largest accepted harmless refusal (a rise over the unedited model with --relative-over-refusal).",
        ),
    ] = 0.1,
    relative_over_refusal: Annotated[
        bool,
        typer.Option(
            "--relative-over-refusal", help="Read --max-over-refusal as a rise over the unedited model."
        ),
    ] = False,
    max_kl: MaxKlOpt = 0.5,
    n_train: NTrainOpt = 128,
    n_val: NValOpt = 32,
    n_test: NTestOpt = 16,
    max_new_tokens: TokensOpt = 24,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json: JsonOpt = False,
) -> None:
    """Conditional ROSI: W <- (I + alpha s_hat g^T) W on blocks start..end-1; export a verified HF model.

    Use --direction with the PARENT's saved direction to repair an abliterated child.
    """
    from lens_safety.calibration import calibrate_conditional, injection_unit
    from lens_safety.export import check_output_dir, export_edit

    started = time.perf_counter()
    check_out(out, overwrite)
    if injection != "auto":
        grid = parse_numbers(injection, "--injection", "1", integer=False)
        if len(grid) != 1:
            raise LensSafetyError(
                f"--injection must be 'auto' or one number, got '{injection}'", "pass e.g. --injection 1"
            )
    elif injections is not None:
        grid = parse_numbers(injections, "--injections", "0.75,1,1.5", integer=False)
    else:
        grid = list(DEFAULT_RELATIVE_INJECTIONS)
    the_layer = parse_layer(layer)
    extra_harmless = parse_prompt_sets(read_harmless)
    splits = load_splits(harmful, harmless, n_train, n_val, n_test)
    loaded = load_cli_model(model, device, dtype, selfcheck=True)
    check_output_dir(loaded.hf_path, out, overwrite)
    blocks, the_end = resolve_blocks(start, starts, end, loaded.n_layers)
    the_direction = obtain_direction(loaded, direction, the_layer, splits["train"], None)
    gap, gap_source = injection_unit(loaded, the_direction, *splits["train"])
    sweep = calibrate_conditional(
        loaded,
        the_direction,
        *splits["train"],
        *splits["val"],
        starts=blocks,
        end=the_end,
        injections=[k * gap for k in grid],
        shrinkage=shrinkage or None,
        template=template,
        read_harmless=extra_harmless,
        target_refusal=target_refusal,
        max_over_refusal=max_over_refusal,
        max_kl=max_kl,
        over_refusal_relative=relative_over_refusal,
        max_new_tokens=max_new_tokens,
        refine=refine if injection == "auto" else 0,
        progress=True,
    )
    point, rule = sweep.result.selected()
    picked = sweep.edits[point.label]
    if rule != "chosen":
        typer.echo(f"warning: {sweep.result.reason}; exporting the {rule} ({point.label})", err=True)
    spec = picked.spec
    measurements = before_after(loaded, spec, splits["test"], max_new_tokens) if n_test > 0 else {}
    extra: dict[str, Any] = {
        "start": picked.read.start,
        "end": picked.read.end,
        "injection_gaps": picked.injection / gap,
        "gap": gap,
        "gap_source": gap_source,
        "read_separation": picked.read.separation,
        "shrinkage": picked.read.shrinkage,
        "template_positions": picked.read.template_positions,
        "read_prompts": {"harmful": picked.read.n_harmful, "harmless": picked.read.n_harmless},
        "choice": rule,
        "message": f"{point.label}: {sweep.result.reason}",
    }
    exported = export_edit(
        loaded,
        spec,
        out,
        direction=the_direction,
        overwrite=overwrite,
        measurements={**measurements, **extra},
        extra_files=calibration_files(sweep.result),
        progress=True,
    )
    extra["seconds"] = time.perf_counter() - started
    print_export_summary(exported, the_direction, measurements, extra, json)
