"""``lens-safety organism train|eval|interpolate``: rebuild, measure and interpolate the refusal model organism."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lens_safety.cli import options, organism_app
from lens_safety.cli.common import print_json, quiet_libraries
from lens_safety.errors import LensSafetyError

if TYPE_CHECKING:
    from lens_safety.organism.rebuild import Rebuild

SplitOpt = Annotated[
    str, typer.Option("--split", help="Prompt split to evaluate on: test (held out) or val.")
]


def _rates(evaluation: dict[str, Any]) -> str:
    hf, hl = evaluation["harmful_refusal"], evaluation["harmless_refusal"]
    kl = evaluation.get("kl_to_base")
    kl_text = (
        ""
        if kl is None
        else f", KL to base {kl:.4f} [{evaluation['kl_interval'][0]:.4f}, {evaluation['kl_interval'][1]:.4f}]"
    )
    return (
        f"harmful refusal {hf['rate']:.3f} ({hf['refused']}/{hf['n']}, 95% CI {hf['interval'][0]:.3f}-{hf['interval'][1]:.3f}), "
        f"harmless over-refusal {hl['rate']:.3f} ({hl['refused']}/{hl['n']}, 95% CI {hl['interval'][0]:.3f}-{hl['interval'][1]:.3f}){kl_text}"
        + _provenance(evaluation)
    )


def _provenance(evaluation: dict[str, Any]) -> str:
    """``"; judged by J on HARMFUL / HARMLESS"`` where the record names them (older records may not)."""
    sets = [evaluation.get(key, {}).get("name") for key in ("harmful_set", "harmless_set")]
    if not evaluation.get("judge") or None in sets:
        return ""
    return f"; judged by {evaluation['judge']} on {sets[0]} / {sets[1]}"


OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Directory for the rebuilt adapter (default: a new cache dir)."),
]
EpochsOpt = Annotated[
    int | None, typer.Option("--epochs", help="Training epochs (default: the shipped config).")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (default: the shipped config).")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", help="torch threads (bitwise reproducibility needs the shipped value)."),
]
MoreHarmlessOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--more-harmless",
        help="Extra benign training prompts (file or builtin:<set>), self-distilled; repeatable. "
        "Replaces the shipped config's list.",
    ),
]
MoreHarmfulOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--more-harmful",
        help="Extra harmful training prompts (file, builtin:<set> or an external train split such as "
        "harmbench:train), taught a refusal; repeatable. Replaces the shipped config's list.",
    ),
]
InitAdapterOpt = Annotated[
    str | None,
    typer.Option(
        "--init-adapter",
        help="Shipped organism or adapter directory whose adapter starts the fit (a continued "
        "fine-tune; 'none' for peft's initialisation).",
    ),
]
LrOpt = Annotated[
    float | None, typer.Option("--lr", help="Peak learning rate (default: the shipped config).")
]
MaxStepsOpt = Annotated[
    int | None,
    typer.Option("--max-steps", min=1, help="Stop after N optimiser steps (default: the shipped config)."),
]
EvaluateOpt = Annotated[
    bool, typer.Option("--eval/--no-eval", help="Measure the rebuilt adapter on the held-out test split.")
]
LikeOpt = Annotated[
    str,
    typer.Option(
        "--like",
        help="Shipped organism whose recorded config is rebuilt and compared (e.g. smollm2-refusal-v1).",
    ),
]
InstallOpt = Annotated[
    bool,
    typer.Option("--install", help="Replace the --like organism's shipped adapter with the rebuild."),
]
AdapterOpt = Annotated[
    Path | None, typer.Option("--adapter", help="Adapter directory (default: the shipped one).")
]


@organism_app.command("train")
def train(
    out: OutOpt = None,
    epochs: EpochsOpt = None,
    seed: SeedOpt = None,
    threads: ThreadsOpt = None,
    more_harmless: MoreHarmlessOpt = None,
    more_harmful: MoreHarmfulOpt = None,
    init_adapter: InitAdapterOpt = None,
    lr: LrOpt = None,
    max_steps: MaxStepsOpt = None,
    evaluate: EvaluateOpt = True,
    like: LikeOpt = "smollm2-refusal",
    install: InstallOpt = False,
    overwrite: options.OverwriteOpt = False,
    json: options.JsonOpt = False,
) -> None:
    """Retrain the organism's LoRA adapter (seeded, CPU) and report whether it matches the shipped one."""
    quiet_libraries()
    from lens_safety.organism.rebuild import rebuild_organism

    rebuild = rebuild_organism(
        out,
        like=like,
        epochs=epochs,
        seed=seed,
        threads=threads,
        more_harmless=more_harmless,
        more_harmful=more_harmful,
        init_adapter=init_adapter,
        lr=lr,
        max_steps=max_steps,
        evaluate=evaluate,
        install=install,
        overwrite=overwrite,
        progress=not json,
    )
    if json:
        print_json(rebuild.to_dict())
        return
    _print_training(rebuild)


def _print_training(rebuild: Rebuild) -> None:
    """The rebuild's adapter, training time, rates and whether it matches the shipped adapter."""
    run, summary = rebuild.run, rebuild.to_dict()
    typer.echo(
        f"adapter written to {summary['out_dir']} ({run.record['adapter_bytes'] / 1e6:.2f} MB, sha256 {run.adapter_sha256[:16]}…)"
    )
    typer.echo(
        f"training wall time {run.record['training']['wall_seconds']:.0f} s, {run.record['training']['steps']} steps"
    )
    if "evaluation" in summary:
        typer.echo("rebuild, test split: " + _rates(summary["evaluation"]["test"]))
    match = summary.get("matches_shipped")
    if match:
        verdict = (
            "bitwise identical to the shipped adapter"
            if match["sha256_equal"]
            else f"differs from the shipped adapter (max |diff| {match['max_abs_diff']})"
        )
        typer.echo(f"rebuild {verdict}")
        if not match["sha256_equal"] and summary.get("shipped_evaluation"):
            typer.echo("shipped, test split: " + _rates(summary["shipped_evaluation"]["test"]))
    if "installed_to" in summary:
        typer.echo(f"installed into {summary['installed_to']}")


@organism_app.command("eval")
def evaluate_cmd(
    adapter: AdapterOpt = None,
    split: SplitOpt = "test",
    limit: options.LimitOpt = None,
    max_new_tokens: options.TokensOpt = 48,
    json: options.JsonOpt = False,
) -> None:
    """Held-out harmful refusal, harmless over-refusal (substring judge, greedy) and first-token KL to the base."""
    quiet_libraries()
    from lens_safety.organism.rebuild import evaluate_adapter

    if split not in {"test", "val"}:
        raise LensSafetyError(
            f"unknown split '{split}' for evaluation", "use --split test (held out) or --split val"
        )
    if adapter is not None and not adapter.is_dir():
        raise LensSafetyError(
            f"adapter directory {adapter} does not exist",
            "pass a directory written by lens-safety organism train",
        )
    evaluation = evaluate_adapter(adapter, split, limit, max_new_tokens, progress=not json)
    if json:
        print_json(evaluation.to_dict())
        return
    typer.echo(f"smollm2-refusal, {split} split: " + _rates(evaluation.to_dict()))


@organism_app.command("interpolate")
def interpolate(
    start: Annotated[str, typer.Argument(help="Adapter directory or shipped organism at t = 0.")],
    end: Annotated[str, typer.Argument(help="Adapter directory or shipped organism at t = 1.")],
    t: Annotated[float, typer.Option("--t", min=0.0, max=1.0, help="Weight of END, in [0, 1].")],
    out: Annotated[Path, typer.Option("--out", help="The new adapter directory.")],
    base: Annotated[
        Path | None,
        typer.Option("--base", help="Base model directory to merge into (default: the embedded smollm2)."),
    ] = None,
    overwrite: options.OverwriteOpt = False,
    json: options.JsonOpt = False,
) -> None:
    """Write the adapter whose merged weights are (1 - t) START + t END (WiSE-FT), and merge it."""
    quiet_libraries()
    from lens_safety.organism.adapter import adapter_dir_of, materialize_organism
    from lens_safety.organism.interpolate import interpolate_adapters

    record = interpolate_adapters(
        adapter_dir_of(start), adapter_dir_of(end), t, out, names=(start, end), overwrite=overwrite
    )
    merged = materialize_organism(out, base_dir=base, name=out.name)
    if json:
        print_json({"out": str(out), "merged": str(merged), **record})
        return
    typer.echo(
        f"wrote {out}: (1 - {t:g}) {start} + {t:g} {end}, a rank-{record['config']['rank']} LoRA of "
        f"{record['adapter_bytes'] / 1e6:.1f} MB (SHA-256 {record['adapter_sha256'][:16]}…)"
    )
    typer.echo(f"merged model: {merged} (a Hugging Face directory; pass it as the model spec)")
