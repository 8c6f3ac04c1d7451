"""``lens-safety rosi`` and ``lens-safety ablate``: parse the options, call
:func:`lens_safety.pipelines.run_edit`, print its summary.

The job (:mod:`lens_safety.pipelines.edit`): the ``train`` split fits the direction (when
``--direction`` is not given), ``val`` calibrates ``--alpha auto``, and ``test`` (``--n-test``
per class) measures refusal before / after; the numbers go into the model card and ``edit.json``.
A saved ``--direction`` is used as is (e.g. a parent's direction to repair an edited child);
``--layer N`` then picks its candidate at block ``N``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lens_safety.cli import app, options
from lens_safety.cli.common import (
    parse_alpha,
    parse_alphas,
    parse_blocks,
    parse_layer,
    print_export_summary,
    quiet_libraries,
)

AlphaOpt = Annotated[str, typer.Option("--alpha", help="auto (calibrate on val) or a number >= 0.")]
ApproximateOpt = Annotated[
    bool, typer.Option("--approximate", help="Allow post-norm writers (Gemma 2/3), where it is inexact.")
]


@app.command()
def rosi(
    model: options.ModelArg = "smollm2",
    out: options.OutOpt = Path("rosi-model"),
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
    """ROSI: add alpha * s_hat * w_bar^T to every attention/MLP output weight; export a verified HF model.

    --system-prompt is used when FITTING the direction only (ROSI's recipe for models that barely
    refuse); calibration and before/after measurements use the model's default formatting.
    Refusal is judged by the substring judge (calibration on val, before/after on test).
    """
    _run("rosi", locals())


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
    _run("orthogonalize", locals())


def _run(method: str, args: dict[str, Any]) -> None:
    """Parse the shared options of ``rosi`` / ``ablate`` into settings, run the job, print it.

    ``--alpha`` is read only for a method with a strength (the edit-method registry's
    ``has_strength``); the registry imports torch, so it is imported here, not at ``--help``."""
    quiet_libraries()
    from lens_safety.edits.methods import edit_method
    from lens_safety.pipelines import EditSettings, run_edit

    alpha = parse_alpha(args["alpha"]) if edit_method(method).has_strength else "auto"
    alphas = parse_alphas(args.get("alphas"))
    layer = parse_layer(args["layer"])
    blocks = parse_blocks(args["blocks"], n_layers=None)  # run_edit checks the range

    # options only rosi has (its bounds) fall back to EditSettings' own defaults for ablate
    bounds: dict[str, Any] = {
        k: args[k]
        for k in ("target_refusal", "max_over_refusal", "over_refusal_relative", "max_kl", "approximate")
        if k in args
    }
    settings = EditSettings(
        method=method,  # type: ignore[arg-type]
        direction=args["direction"],
        harmful=args["harmful"],
        harmless=args["harmless"],
        layer=layer,
        alpha=alpha,
        alphas=None if alphas is None else tuple(alphas),
        blocks=None if blocks is None else tuple(blocks),
        system_prompt=args["system_prompt"],
        n_train=args["n_train"],
        n_val=args["n_val"],
        n_test=args["n_test"],
        max_new_tokens=args["max_new_tokens"],
        **bounds,
    )
    result = run_edit(
        args["model"],
        args["out"],
        settings,
        overwrite=args["overwrite"],
        device=args["device"],
        dtype=args["dtype"],
        progress=True,
    )
    print_export_summary(result.to_dict(), args["json"])
