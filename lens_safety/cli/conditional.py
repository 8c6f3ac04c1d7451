"""``lens-safety conditional-rosi``: parse the options, call
:func:`lens_safety.pipelines.run_conditional`, print its summary.

The job (:mod:`lens_safety.pipelines.conditional`) edits every attention/MLP writer of blocks
``start .. end - 1`` to ``W' = (I + alpha s_hat g^T) W``: the refusal direction ``s_hat`` is
written in proportion to what the block writes along ``g``, a read direction estimated on the
TRAIN split that separates harmful from harmless prompts. Unlike ``lens-safety rosi``
(``W + alpha s_hat w_bar^T``, a harm-blind bias) it can restore refusal on an abliterated model
without refusing everything. Injections are in units of the refusal direction's gap;
``--start auto`` / ``--injection auto`` sweep ``--starts`` x ``--injections`` on the VAL split
with ``--refine`` rounds of bisection; the TEST split measures before / after.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lens_safety.cli import app, options
from lens_safety.cli.common import (
    parse_layer,
    parse_numbers,
    parse_prompt_sets,
    print_export_summary,
    quiet_libraries,
)
from lens_safety.errors import LensSafetyError

#: Injections swept by default, in gaps (the library's ``DEFAULT_RELATIVE_INJECTIONS``).
DEFAULT_INJECTIONS_TEXT = "0.75,1,1.5,2"


def parse_starts(start: str, starts: str | None) -> list[int] | None:
    """``--start N`` (one block) or ``--start auto`` with ``--starts`` (``None``: the default sweep)."""
    if start != "auto":
        candidates = parse_numbers(start, "--start", "15", integer=True)
        if len(candidates) != 1:
            raise LensSafetyError(
                f"--start must be 'auto' or one block, got '{start}'", "pass e.g. --start 15"
            )
    elif starts is not None:
        candidates = parse_numbers(starts, "--starts", "10,15,20", integer=True)
    else:
        return None
    return sorted({int(b) for b in candidates})


def parse_injections(injection: str, injections: str | None) -> list[float]:
    """``--injection X`` (one number) or ``--injection auto`` with ``--injections`` (gaps)."""
    if injection != "auto":
        grid = parse_numbers(injection, "--injection", "1", integer=False)
        if len(grid) != 1:
            raise LensSafetyError(
                f"--injection must be 'auto' or one number, got '{injection}'", "pass e.g. --injection 1"
            )
        return grid
    return parse_numbers(injections or DEFAULT_INJECTIONS_TEXT, "--injections", "0.75,1,1.5", integer=False)


ConditionalOutOpt = Annotated[Path, typer.Option("--out", help="Output directory of the edited model.")]
StartOpt = Annotated[
    str, typer.Option("--start", help="First edited block: auto (swept on val) or a block index.")
]
StartsOpt = Annotated[
    str | None,
    typer.Option("--starts", help="First blocks swept by --start auto (default: ~1/3, 1/2, 2/3 of depth)."),
]
EndOpt = Annotated[
    int | None,
    typer.Option("--end", help="One past the last edited block (default n_layers - 1; n_layers: all)."),
]
InjectionOpt = Annotated[
    str,
    typer.Option("--injection", help="Injection in gaps: auto (swept on val) or a number > 0."),
]
InjectionsOpt = Annotated[
    str | None,
    typer.Option(
        "--injections",
        help="Injections swept by --injection auto, in gaps: the direction's harmful minus harmless mean "
        "projection (default 0.75,1,1.5,2).",
    ),
]
ShrinkageOpt = Annotated[
    float,
    typer.Option(
        "--shrinkage", min=0.0, help="Shrinkage-LDA ridge of the read direction (0: the mean difference)."
    ),
]
ReadHarmlessOpt = Annotated[
    str,
    typer.Option(
        "--read-harmless",
        help="Benign prompt sets (comma-separated) added to the harmless train prompts of the read "
        "directions, e.g. look-alikes of harmful requests (default none).",
    ),
]
RefineOpt = Annotated[
    int,
    typer.Option(
        "--refine", min=0, help="Bisection rounds on the injection after the grid (--injection auto)."
    ),
]


@app.command("conditional-rosi")
def conditional_rosi_cmd(
    model: options.ModelArg = "smollm2",
    out: ConditionalOutOpt = Path("conditional-rosi-model"),
    direction: options.DirectionOpt = None,
    harmful: options.HarmfulOpt = "builtin:harmful",
    harmless: options.HarmlessOpt = "builtin:harmless",
    layer: options.LayerOpt = "auto",
    start: StartOpt = "auto",
    starts: StartsOpt = None,
    end: EndOpt = None,
    injection: InjectionOpt = "auto",
    injections: InjectionsOpt = None,
    shrinkage: ShrinkageOpt = 1.0,
    template: options.TemplateBlindOpt = False,
    read_harmless: ReadHarmlessOpt = "none",
    refine: RefineOpt = 2,
    target_refusal: options.TargetRefusalOpt = 0.85,
    max_over_refusal: options.MaxOverRefusalOpt = 0.1,
    over_refusal_relative: options.OverRefusalRelativeOpt = False,
    max_kl: options.MaxKlOpt = 0.5,
    n_train: options.NTrainOpt = 128,
    n_val: options.NValOpt = 32,
    n_test: options.NTestOpt = 16,
    max_new_tokens: options.TokensOpt = 24,
    overwrite: options.OverwriteOpt = False,
    device: options.DeviceOpt = None,
    dtype: options.DtypeOpt = None,
    json: options.JsonOpt = False,
) -> None:
    """Conditional ROSI: W <- (I + alpha s_hat g^T) W on blocks start..end-1; export a verified HF model.

    Use --direction with the PARENT's saved direction to repair an abliterated child. Refusal
    (calibration on val, before/after on test) is judged by the substring judge.
    """
    the_layer = parse_layer(layer)
    grid = parse_injections(injection, injections)
    first_blocks = parse_starts(start, starts)
    extra_harmless = parse_prompt_sets(read_harmless)
    quiet_libraries()
    from lens_safety.pipelines import ConditionalSettings, run_conditional

    settings = ConditionalSettings(
        direction=direction,
        harmful=harmful,
        harmless=harmless,
        layer=the_layer,
        starts=None if first_blocks is None else tuple(first_blocks),
        end=end,
        injections=tuple(grid),
        refine=refine if injection == "auto" else 0,
        shrinkage=shrinkage or None,
        template=template,
        read_harmless=tuple(extra_harmless),
        target_refusal=target_refusal,
        max_over_refusal=max_over_refusal,
        over_refusal_relative=over_refusal_relative,
        max_kl=max_kl,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        max_new_tokens=max_new_tokens,
    )
    result = run_conditional(
        model, out, settings, overwrite=overwrite, device=device, dtype=dtype, progress=True
    )
    print_export_summary(result.to_dict(), json)
