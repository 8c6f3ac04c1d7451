"""``lens-safety rosi`` and ``lens-safety ablate``: fit or load a direction, calibrate, edit, export.

Prompt splits (deterministic, by topic pair; see :mod:`lens_safety.prompts`): the ``train`` split
fits the direction (when ``--direction`` is not given), ``val`` calibrates ``--alpha auto``, and
``test`` (``--n-test`` per class) measures refusal before / after; the numbers go into the model
card and ``edit.json``. A saved ``--direction`` is used as is (e.g. a parent's direction to repair
an edited child); ``--layer N`` then picks its candidate at block ``N``.
"""

from __future__ import annotations

import json as json_module
import math
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
    SystemPromptOpt,
    load_cli_model,
    print_json,
    stdout_console,
)
from lens_safety.errors import LensSafetyError

OutOpt = Annotated[Path, typer.Option("--out", help="Output directory of the edited Hugging Face model.")]
DirectionOpt = Annotated[
    Path | None,
    typer.Option("--direction", help="Saved direction directory (default: fit one on the train split)."),
]
HarmfulOpt = Annotated[
    str, typer.Option("--harmful", help="Harmful prompts: .txt/.jsonl/.csv file or builtin:harmful.")
]
HarmlessOpt = Annotated[
    str, typer.Option("--harmless", help="Harmless prompts: .txt/.jsonl/.csv file or builtin:harmless.")
]
LayerOpt = Annotated[str, typer.Option("--layer", help="Direction layer: auto (selection) or a block index.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")]
NTrainOpt = Annotated[
    int, typer.Option("--n-train", help="Training prompts per class that fit the direction.")
]
NValOpt = Annotated[
    int, typer.Option("--n-val", help="Validation prompts per class (selection, calibration).")
]
NTestOpt = Annotated[
    int, typer.Option("--n-test", help="Test prompts per class for before/after refusal (0: skip).")
]
TokensOpt = Annotated[
    int, typer.Option("--max-new-tokens", help="Greedy tokens per completion when judging refusal.")
]
MaxKlOpt = Annotated[float, typer.Option("--max-kl", help="Largest accepted harmless first-token KL.")]
TargetRefusalOpt = Annotated[float, typer.Option("--target-refusal", help="Harmful refusal to reach.")]
BlocksOpt = Annotated[
    str | None,
    typer.Option("--blocks", help="Blocks whose writers are edited: 'all' (default) or e.g. 15-29."),
]


def parse_alpha(value: str) -> float | str:
    """``auto`` or a finite non-negative float."""
    if value == "auto":
        return "auto"
    try:
        alpha = float(value)
    except ValueError:
        raise LensSafetyError(
            f"--alpha must be 'auto' or a number, got '{value}'", "pass e.g. --alpha 30"
        ) from None
    if not math.isfinite(alpha) or alpha < 0:
        raise LensSafetyError(
            f"--alpha must be a finite number >= 0, got {value} (a negative ROSI alpha removes safety)",
            "pass e.g. --alpha 30 or --alpha auto",
        )
    return alpha


def parse_alphas(value: str | None) -> list[float] | None:
    if value is None:
        return None
    values = [parse_alpha(x.strip()) for x in value.split(",") if x.strip()]
    if not values or any(v == "auto" or v == 0 for v in values):
        raise LensSafetyError(
            f"--alphas must be positive numbers, got '{value}'", "pass e.g. --alphas 10,30,100"
        )
    return [float(v) for v in values]


def parse_layer(value: str) -> int | str:
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise LensSafetyError(
            f"--layer must be 'auto' or an integer, got '{value}'", "pass e.g. --layer auto"
        ) from None


def parse_blocks(value: str | None, n_layers: int | None) -> list[int] | None:
    """``all`` / ``None`` -> all blocks; ``a-b`` (inclusive) or ``a,b,c``.

    ``n_layers=None`` checks the syntax only (the caller checks the range once the model is loaded).
    """
    if value is None or value == "all":
        return None
    try:
        if "-" in value.strip("-"):
            lo, hi = (int(x) for x in value.split("-", 1))
            blocks = list(range(lo, hi + 1))
        else:
            blocks = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise LensSafetyError(
            f"--blocks must be 'all', 'a-b' or 'a,b,c', got '{value}'", "pass e.g. --blocks 15-29"
        ) from None
    bad = [b for b in blocks if b < 0 or (n_layers is not None and b >= n_layers)]
    if bad or not blocks:
        valid = "non-negative block indices" if n_layers is None else f"blocks 0..{n_layers - 1}"
        raise LensSafetyError(f"--blocks {value} is outside {valid}", f"use {valid}")
    return blocks


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise LensSafetyError(
            f"output directory {out} already exists", "pass --overwrite or choose another --out"
        )


def load_splits(
    harmful: str, harmless: str, n_train: int, n_val: int, n_test: int
) -> dict[str, tuple[Any, Any]]:
    """``{"train" | "val" | "test": (harmful, harmless)}`` from the deterministic splits, capped in size."""
    from lens_safety.probing import validate_classes
    from lens_safety.prompts import PromptSet

    for value, name in ((n_train, "n-train"), (n_val, "n-val"), (n_test, "n-test")):
        if value < 0 or (value == 0 and name != "n-test"):
            raise LensSafetyError(f"--{name} must be positive, got {value}", f"pass e.g. --{name} 16")
    sets = PromptSet.load(harmful), PromptSet.load(harmless)
    validate_classes(*sets)
    out: dict[str, tuple[Any, Any]] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        parts = tuple(s.split(split).head(n) for s in sets)
        if n and min(len(p) for p in parts) == 0:
            raise LensSafetyError(
                f"the {split} split of the prompts is empty (too few prompts)",
                "give more prompts (a few dozen per class) or pass --direction and --alpha",
            )
        out[split] = parts  # type: ignore[assignment]
    return out


def obtain_direction(
    model: Any,
    direction_dir: Path | None,
    layer: int | str,
    train: tuple[Any, Any],
    system_prompt: str | None,
) -> Any:
    """A saved direction (its candidate at ``layer`` when a number is given) or one fitted on ``train``."""
    from dataclasses import replace

    from lens_safety.directions import Direction, find_direction
    from lens_safety.selection import SelectionConfig

    if direction_dir is not None:
        direction = Direction.load(direction_dir, model=model)
        if isinstance(layer, int):
            if not 0 <= layer < direction.n_layers:
                raise LensSafetyError(f"--layer {layer} is out of range", f"use 0..{direction.n_layers - 1}")
            direction = replace(direction, layer=layer)
        return direction
    if isinstance(layer, int) and not 0 <= layer < model.n_layers:
        raise LensSafetyError(f"--layer {layer} is out of range", f"use 0..{model.n_layers - 1} or auto")
    report = find_direction(
        model,
        train[0],
        train[1],
        layer=layer,  # type: ignore[arg-type]
        position=-1,
        selection=SelectionConfig(system_prompt=system_prompt),
        system_prompt=system_prompt,
        progress=True,
    )
    if report.selection is not None and report.selection.fallback:
        typer.echo(f"warning: {report.selection.message}", err=True)
    return report.direction


def before_after(model: Any, spec: Any, test: tuple[Any, Any], max_new_tokens: int) -> dict[str, Any]:
    """Refusal on the test split (greedy, substring judge), unedited then edited."""
    from lens_safety.edits import applied_edit
    from lens_safety.evaluation import refusal_rate

    def rates() -> tuple[float, float]:
        h, b = (refusal_rate(model, p, max_new_tokens=max_new_tokens, progress=True).rate for p in test)
        return h, b

    before = rates()
    with applied_edit(model, spec):
        after = rates()
    return {
        "harmful_refusal": {"before": before[0], "after": after[0]},
        "harmless_refusal": {"before": before[1], "after": after[1]},
        "n_test": [len(test[0]), len(test[1])],
        "judge": "substring",
        "max_new_tokens": max_new_tokens,
    }


def calibration_files(result: Any) -> dict[str, str]:
    from lens_safety.viz.calibration import calibration_figure

    figure = calibration_figure(result)
    return {
        "calibration.json": json_module.dumps(result.to_dict(), indent=2),
        "calibration.html": figure.to_html(include_plotlyjs="cdn", full_html=True),
    }


def _choose_alpha(result: Any) -> tuple[float, str, str]:
    """``(alpha, how, message)`` from a calibration; raises when no point is inside the collateral bounds."""
    if result.chosen is not None:
        return result.chosen.alpha, "calibrated", result.reason
    if result.fallback is None:
        raise LensSafetyError(
            f"{result.reason}; and every alpha broke the over-refusal or KL bound",
            "pass smaller --alphas, looser --max-over-refusal / --max-kl, or a fixed --alpha",
        )
    fb = result.fallback
    message = (
        f"{result.reason}; exported alpha={fb.alpha:g}, the point with the highest harmful refusal "
        f"({fb.harmful_refusal:.2f}) inside the over-refusal and KL bounds"
    )
    return fb.alpha, "fallback", message


def print_export_summary(
    result: Any, direction: Any, measurements: dict[str, Any], extra: dict[str, Any], as_json: bool
) -> None:
    summary = {
        "out": result.out_dir,
        "method": result.edit["method"],
        "alpha": result.edit["alpha"],
        "layer": direction.layer,
        "position": direction.position,
        "targets": result.edit["targets"],
        "blocks": result.edit["layers"],
        "edited_parameters": len(result.edit["edited_parameters"]),
        "max_abs_logit_diff": result.max_abs_logit_diff,
        "export_seconds": result.seconds,
        **{k: v for k, v in measurements.items() if k in ("harmful_refusal", "harmless_refusal")},
        **extra,
    }
    if as_json:
        print_json(summary)
        return

    console = stdout_console()
    console.print(
        f"[bold]{summary['method']}[/bold] alpha={summary['alpha']:g} direction layer {summary['layer']} "
        f"-> {summary['out']} (max |logit diff| on reload {summary['max_abs_logit_diff']:.2g})"
    )
    for key in ("harmful_refusal", "harmless_refusal"):
        if key in summary:
            console.print(
                f"{key.replace('_', ' ')}: {summary[key]['before']:.2f} -> {summary[key]['after']:.2f}"
            )
    if extra.get("message"):
        console.print(extra["message"])


@app.command()
def rosi(
    model: ModelArg = "smollm2",
    out: OutOpt = Path("rosi-model"),
    direction: DirectionOpt = None,
    harmful: HarmfulOpt = "builtin:harmful",
    harmless: HarmlessOpt = "builtin:harmless",
    layer: LayerOpt = "auto",
    alpha: Annotated[str, typer.Option("--alpha", help="auto (calibrate on val) or a number >= 0.")] = "auto",
    alphas: Annotated[
        str | None, typer.Option("--alphas", help="Alphas swept by --alpha auto (default 3,10,30,100).")
    ] = None,
    target_refusal: TargetRefusalOpt = 0.9,
    max_over_refusal: Annotated[
        float,
        typer.Option(
            "--max-over-refusal",
            help="Largest accepted rise of harmless refusal over the unedited model "
            "(an absolute ceiling with --absolute-over-refusal).",
        ),
    ] = 0.1,
    absolute_over_refusal: Annotated[
        bool,
        typer.Option(
            "--absolute-over-refusal", help="Read --max-over-refusal as an absolute harmless-refusal ceiling."
        ),
    ] = False,
    max_kl: MaxKlOpt = 0.1,
    blocks: BlocksOpt = None,
    system_prompt: SystemPromptOpt = None,
    n_train: NTrainOpt = 64,
    n_val: NValOpt = 16,
    n_test: NTestOpt = 16,
    max_new_tokens: TokensOpt = 24,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json: JsonOpt = False,
) -> None:
    """ROSI: add alpha * s_hat * w_bar^T to every attention/MLP output weight; export a verified HF model.

    --system-prompt is used when FITTING the direction only (ROSI's recipe for models that barely
    refuse); calibration and before/after measurements use the model's default formatting.
    """
    _run("rosi", locals())


@app.command()
def ablate(
    model: ModelArg = "smollm2",
    out: OutOpt = Path("ablated-model"),
    direction: DirectionOpt = None,
    harmful: HarmfulOpt = "builtin:harmful",
    harmless: HarmlessOpt = "builtin:harmless",
    layer: LayerOpt = "auto",
    blocks: BlocksOpt = None,
    system_prompt: SystemPromptOpt = None,
    n_train: NTrainOpt = 64,
    n_val: NValOpt = 16,
    n_test: NTestOpt = 16,
    max_new_tokens: TokensOpt = 24,
    approximate: Annotated[
        bool, typer.Option("--approximate", help="Allow post-norm writers (Gemma 2/3), where it is inexact.")
    ] = False,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    json: JsonOpt = False,
) -> None:
    """Weight orthogonalisation (abliteration): W <- (I - s s^T) W on every writer, embeddings included."""
    _run("orthogonalize", locals())


def _run(method: str, args: dict[str, Any]) -> None:
    from lens_safety.edits import make_spec
    from lens_safety.export import check_output_dir, export_edit

    started = time.perf_counter()
    out: Path = args["out"]
    check_out(out, args["overwrite"])
    fixed_alpha = parse_alpha(args["alpha"]) if method == "rosi" else None
    grid = parse_alphas(args.get("alphas"))
    layer = parse_layer(args["layer"])
    needs_prompts = args["direction"] is None or fixed_alpha == "auto" or args["n_test"] > 0
    splits = (
        load_splits(args["harmful"], args["harmless"], args["n_train"], args["n_val"], args["n_test"])
        if needs_prompts
        else {}
    )
    loaded = load_cli_model(args["model"], args["device"], args["dtype"], selfcheck=True)
    check_output_dir(loaded.hf_path, out, args["overwrite"])
    blocks = parse_blocks(args["blocks"], loaded.n_layers)
    the_direction = obtain_direction(
        loaded, args["direction"], layer, splits.get("train", ((), ())), args["system_prompt"]
    )
    extra: dict[str, Any] = {"system_prompt_at_extraction": args["system_prompt"]}
    files: dict[str, str] = {}
    spec_kwargs: dict[str, Any] = {"layers": blocks, "d_model": loaded.d_model}
    if method == "orthogonalize":
        spec_kwargs["approximate"] = args["approximate"]
    if fixed_alpha == "auto":
        from lens_safety.calibration import calibrate_alpha

        result = calibrate_alpha(
            loaded,
            the_direction,
            *splits["val"],
            alphas=grid,
            target_refusal=args["target_refusal"],
            max_over_refusal=args["max_over_refusal"],
            over_refusal_relative=not args["absolute_over_refusal"],
            max_kl=args["max_kl"],
            layers=blocks,
            max_new_tokens=args["max_new_tokens"],
            progress=True,
        )
        chosen, how, message = _choose_alpha(result)
        spec_kwargs["alpha"] = chosen
        files = calibration_files(result)
        extra.update(
            {
                "alpha_choice": how,
                "message": message,
                "calibration": [p.to_dict() for p in result.points],
                "calibration_baseline": result.baseline.to_dict(),
            }
        )
        if how == "fallback":
            typer.echo(f"warning: {message}", err=True)
    elif fixed_alpha is not None:
        spec_kwargs["alpha"] = fixed_alpha
        extra["alpha_choice"] = "fixed"
    spec = make_spec(method, the_direction, **spec_kwargs)
    measurements: dict[str, Any] = {}
    if args["n_test"] > 0:
        measurements = before_after(loaded, spec, splits["test"], args["max_new_tokens"])
    card = {
        **measurements,
        **{k: v for k, v in extra.items() if k not in ("calibration", "calibration_baseline")},
    }
    exported = export_edit(
        loaded,
        spec,
        out,
        direction=the_direction,
        overwrite=args["overwrite"],
        measurements=card,
        extra_files=files,
        progress=True,
    )
    extra["seconds"] = time.perf_counter() - started
    print_export_summary(exported, the_direction, measurements, extra, args["json"])
