"""The commands that edit weights and export a verified Hugging Face model: ``lens-safety rosi``,
``amplify``, ``ablate`` and ``conditional-rosi``. Each parses its options into the job's settings, calls
:func:`lens_safety.pipelines.run_edit` or :func:`lens_safety.pipelines.run_conditional` and
prints the summary.

The jobs share one protocol: the ``train`` split fits the direction (when ``--direction`` is not
given), ``val`` calibrates (``--alpha auto``; ``--start`` / ``--injection auto``), and ``test``
(``--n-test`` per class) measures refusal before / after; the numbers go into the model card and
``edit.json``. A saved ``--direction`` is used as is (e.g. a parent's direction to repair an
edited child); ``--layer N`` then picks its candidate at block ``N``.

* ``rosi``: ``W' = W + alpha s_hat w_bar^T`` on every attention/MLP writer, a harm-blind bias
  along the refusal direction ``s_hat``.
* ``amplify``: ``W' = (I + alpha s_hat s_hat^T) W`` on the same writers: it rescales what each
  already writes along ``s_hat`` (inert after abliteration). ``rosi`` and ``amplify`` are one
  command function (:func:`strength_command`) with one method each.
* ``ablate``: ``W' = (I - s_hat s_hat^T) W`` on every writer, embeddings included (abliteration).
* ``conditional-rosi``: ``W' = (I + alpha s_hat g^T) W`` on blocks ``start .. end - 1``: the
  refusal direction is written in proportion to what the block writes along ``g``, a read
  direction estimated on ``train`` that separates harmful from harmless prompts, so it can restore
  refusal on an abliterated model without refusing everything. Injections are in units of the
  refusal direction's gap; ``--start auto`` / ``--injection auto`` sweep ``--starts`` x
  ``--injections`` on ``val`` with ``--refine`` rounds of bisection.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from lens_safety.cli import app, options
from lens_safety.cli.common import (
    given,
    parse_alpha,
    parse_alphas,
    parse_blocks,
    parse_injections,
    parse_layer,
    parse_numbers,
    parse_prompt_sets,
    parse_starts,
    print_export_summary,
    quiet_libraries,
)
from lens_safety.errors import LensSafetyError

if TYPE_CHECKING:
    from lens_safety.pipelines import EditSettings

# rosi, amplify and ablate

AlphaOpt = Annotated[
    str,
    typer.Option("--alpha", help="auto (calibrate on val) or a number (rosi: >= 0; amplify: >= -1)."),
]
ApproximateOpt = Annotated[
    bool, typer.Option("--approximate", help="Allow post-norm writers (Gemma 2/3), where it is inexact.")
]

#: the help texts (one line per paragraph: typer keeps a help text's line breaks)
ROSI_HELP = (
    "ROSI: add alpha * s_hat * w_bar^T to every attention/MLP output weight; export a verified HF model."
    "\n\n--system-prompt is used when FITTING the direction only (ROSI's recipe for models that barely "
    "refuse); calibration and before/after measurements use the model's default formatting. Refusal is "
    "judged by the substring judge (calibration on val, before/after on test)."
)
AMPLIFY_HELP = (
    "Amplify: W <- (I + alpha s_hat s_hat^T) W on every attention/MLP writer; export a verified HF model."
    "\n\nIt rescales what each writer already writes along the refusal direction, so it is inert where "
    "nothing is (after abliteration: use rosi or conditional-rosi there). Options as for rosi; refusal "
    "is judged by the substring judge (calibration on val, before/after on test)."
)


def strength_command(method: Literal["rosi", "amplify"], default_out: str) -> Callable[..., None]:
    """The command of an edit with a calibrated strength: ``rosi`` and ``amplify`` take the same
    options and differ only in the method they pass to :func:`~lens_safety.pipelines.run_edit`."""

    def command(
        model: options.ModelArg = "smollm2",
        out: options.OutOpt = Path(default_out),
        direction: options.DirectionOpt = None,
        harmful: options.HarmfulOpt = "builtin:harmful",
        harmless: options.HarmlessOpt = "builtin:harmless",
        layer: options.LayerOpt = "auto",
        alpha: AlphaOpt = "auto",
        alphas: options.AlphasOpt = None,
        target_refusal: options.TargetRefusalOpt = 0.9,
        max_over_refusal: options.MaxOverRefusalOpt = 0.1,
        over_refusal_relative: options.OverRefusalRelativeOpt = True,
        max_kl: options.MaxKlOpt = 0.1,
        blocks: options.BlocksOpt = None,
        system_prompt: options.SystemPromptOpt = None,
        n_train: options.NTrainOpt = 64,
        n_val: options.NValOpt = 16,
        n_test: options.NTestOpt = 16,
        max_new_tokens: options.TokensOpt = 24,
        overwrite: options.OverwriteOpt = False,
        device: options.DeviceOpt = None,
        dtype: options.DtypeOpt = None,
        json: options.JsonOpt = False,
    ) -> None:
        the_layer, the_alpha = parse_layer(layer), parse_alpha(alpha, method)
        grid, chosen_blocks = parse_alphas(alphas, method), _blocks(blocks)
        quiet_libraries()
        from lens_safety.pipelines import EditSettings

        settings = EditSettings(
            method=method,
            direction=direction,
            harmful=harmful,
            harmless=harmless,
            layer=the_layer,
            alpha=the_alpha,
            alphas=None if grid is None else tuple(grid),
            target_refusal=target_refusal,
            max_over_refusal=max_over_refusal,
            over_refusal_relative=over_refusal_relative,
            max_kl=max_kl,
            blocks=chosen_blocks,
            system_prompt=system_prompt,
            n_train=n_train,
            n_val=n_val,
            n_test=n_test,
            max_new_tokens=max_new_tokens,
        )
        _export(model, out, settings, overwrite, device, dtype, json)

    return command


app.command("rosi", help=ROSI_HELP)(strength_command("rosi", "rosi-model"))
app.command("amplify", help=AMPLIFY_HELP)(strength_command("amplify", "amplified-model"))


@app.command()
def ablate(
    model: options.ModelArg = "smollm2",
    out: options.OutOpt = Path("ablated-model"),
    direction: options.DirectionOpt = None,
    harmful: options.HarmfulOpt = "builtin:harmful",
    harmless: options.HarmlessOpt = "builtin:harmless",
    layer: options.LayerOpt = "auto",
    blocks: options.BlocksOpt = None,
    system_prompt: options.SystemPromptOpt = None,
    n_train: options.NTrainOpt = 64,
    n_val: options.NValOpt = 16,
    n_test: options.NTestOpt = 16,
    max_new_tokens: options.TokensOpt = 24,
    approximate: ApproximateOpt = False,
    overwrite: options.OverwriteOpt = False,
    device: options.DeviceOpt = None,
    dtype: options.DtypeOpt = None,
    json: options.JsonOpt = False,
) -> None:
    """Weight orthogonalisation (abliteration): W <- (I - s s^T) W on every writer, embeddings included.

    Refusal before/after on the test split is judged by the substring judge.
    """
    the_layer, chosen_blocks = parse_layer(layer), _blocks(blocks)
    quiet_libraries()
    from lens_safety.pipelines import EditSettings

    settings = EditSettings(
        method="orthogonalize",
        direction=direction,
        harmful=harmful,
        harmless=harmless,
        layer=the_layer,
        blocks=chosen_blocks,
        system_prompt=system_prompt,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        max_new_tokens=max_new_tokens,
        approximate=approximate,
    )
    _export(model, out, settings, overwrite, device, dtype, json)


def _blocks(blocks: str | None) -> tuple[int, ...] | None:
    """``--blocks`` as block indices (``None``: the method's default; run_edit checks the range)."""
    chosen = parse_blocks(blocks, n_layers=None)
    return None if chosen is None else tuple(chosen)


def _export(
    model: str,
    out: Path,
    settings: EditSettings,
    overwrite: bool,
    device: str | None,
    dtype: str | None,
    as_json: bool,
) -> None:
    """Run :func:`~lens_safety.pipelines.run_edit` with ``settings`` and print its summary."""
    from lens_safety.pipelines import run_edit

    result = run_edit(model, out, settings, overwrite=overwrite, device=device, dtype=dtype, progress=True)
    print_export_summary(result.to_dict(), as_json)


# conditional-rosi: its single-value options and their parsing


def parse_start(start: str, starts: str | None) -> tuple[int, ...] | None:
    """``--start N`` (one block) or ``--start auto`` with ``--starts`` (``None``: the job's default sweep)."""
    if start == "auto":
        return parse_starts(starts)
    candidates = parse_numbers(start, "--start", "15", integer=True)
    if len(candidates) != 1:
        raise LensSafetyError(f"--start must be 'auto' or one block, got '{start}'", "pass e.g. --start 15")
    return (int(candidates[0]),)


def parse_injection(injection: str, injections: str | None) -> tuple[float, ...] | None:
    """``--injection X`` (one number, in gaps) or ``--injection auto`` with ``--injections``
    (``None``: the job's default grid)."""
    if injection == "auto":
        return parse_injections(injections)
    grid = parse_numbers(injection, "--injection", "1", integer=False)
    if len(grid) != 1:
        raise LensSafetyError(
            f"--injection must be 'auto' or one number, got '{injection}'", "pass e.g. --injection 1"
        )
    return tuple(grid)


StartOpt = Annotated[
    str, typer.Option("--start", help="First edited block: auto (sweeps --starts on val) or a block index.")
]
EndOpt = Annotated[
    int | None,
    typer.Option("--end", help="One past the last edited block (default n_layers - 1; n_layers: all)."),
]
InjectionOpt = Annotated[
    str,
    typer.Option("--injection", help="Injection in gaps: auto (sweeps --injections on val) or a number > 0."),
]


@app.command("conditional-rosi")
def conditional_rosi_cmd(
    model: options.ModelArg = "smollm2",
    out: options.OutOpt = Path("conditional-rosi-model"),
    direction: options.DirectionOpt = None,
    harmful: options.HarmfulOpt = "builtin:harmful",
    harmless: options.HarmlessOpt = "builtin:harmless",
    layer: options.LayerOpt = "auto",
    start: StartOpt = "auto",
    starts: options.StartsOpt = None,
    end: EndOpt = None,
    injection: InjectionOpt = "auto",
    injections: options.InjectionsOpt = None,
    shrinkage: options.ShrinkageOpt = 1.0,
    template: options.TemplateBlindOpt = False,
    read_harmless: options.ReadHarmlessOpt = None,
    refine: options.RefineOpt = None,
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
    first_blocks, grid = parse_start(start, starts), parse_injection(injection, injections)
    extra_harmless = None if read_harmless is None else tuple(parse_prompt_sets(read_harmless))
    quiet_libraries()
    from lens_safety.pipelines import ConditionalSettings, run_conditional

    settings = ConditionalSettings(
        direction=direction,
        harmful=harmful,
        harmless=harmless,
        layer=the_layer,
        starts=first_blocks,
        end=end,
        shrinkage=shrinkage or None,
        template=template,
        target_refusal=target_refusal,
        max_over_refusal=max_over_refusal,
        over_refusal_relative=over_refusal_relative,
        max_kl=max_kl,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        max_new_tokens=max_new_tokens,
        **given(
            injections=grid,
            refine=refine if injection == "auto" else 0,
            read_harmless=extra_harmless,
        ),
    )
    result = run_conditional(
        model, out, settings, overwrite=overwrite, device=device, dtype=dtype, progress=True
    )
    print_export_summary(result.to_dict(), json)
