"""``lens-safety organism train|eval``: rebuild and measure the refusal model organism."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from lens_safety.cli import app
from lens_safety.cli.common import (
    JsonOpt,
    TemplateBlindOpt,
    parse_alphas,
    parse_blocks,
    parse_heldout_pairs,
    parse_numbers,
    parse_prompt_sets,
    print_json,
    quiet_libraries,
)
from lens_safety.errors import LensSafetyError
from lens_safety.fsutil import staged_directory
from lens_safety.organism.sets import HELDOUT_PAIRS, READ_HARMLESS

organism_app = typer.Typer(
    help="The refusal model organism (smollm2-refusal): rebuild its adapter, measure it.",
    no_args_is_help=True,
)
app.add_typer(organism_app, name="organism")

SplitOpt = Annotated[
    str, typer.Option("--split", help="Prompt split to evaluate on: test (held out) or val.")
]
LimitOpt = Annotated[
    int | None, typer.Option("--limit", help="Evaluate only the first N harmful and N harmless prompts.")
]
TokensOpt = Annotated[
    int, typer.Option("--max-new-tokens", help="Greedy tokens generated per prompt for the judge.")
]


def _rates(evaluation: dict) -> str:
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
    )


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
        help="Shipped organism whose adapter starts the fit (a continued fine-tune; 'none' for "
        "peft's initialisation).",
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
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out directory.")]


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
    overwrite: OverwriteOpt = False,
    json: JsonOpt = False,
) -> None:
    """Retrain the organism's LoRA adapter (seeded, CPU) and report whether it matches the shipped one."""
    quiet_libraries()
    from lens_safety.organism.adapter import shipped_adapter_dir
    from lens_safety.organism.build import read_training_record, train_organism
    from lens_safety.organism.rebuild import compare_adapters, evaluate_adapter, record_evaluation
    from lens_safety.organism.train import TrainingConfig
    from lens_safety.sources import cache_dir

    shipped = shipped_adapter_dir(like)
    base_config = dict(read_training_record(shipped).get("config") or TrainingConfig().to_dict())
    base_config["target_modules"] = tuple(base_config.get("target_modules", TrainingConfig().target_modules))
    base_config["more_harmless"] = tuple(base_config.get("more_harmless", ()))
    given = {"epochs": epochs, "seed": seed, "threads": threads, "lr": lr, "max_steps": max_steps}
    overrides: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if more_harmless is not None:
        overrides["more_harmless"] = tuple(more_harmless)
    if more_harmful is not None:
        overrides["more_harmful"] = tuple(more_harmful)
    if init_adapter is not None:
        overrides["init_adapter"] = None if init_adapter == "none" else init_adapter
        if overrides["init_adapter"] is not None:
            shipped_adapter_dir(overrides["init_adapter"])  # an unknown name fails before any work
    config = TrainingConfig(**{**base_config, **overrides})
    target = (
        out if out is not None else cache_dir() / "organism" / f"rebuild-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise LensSafetyError(
            f"output directory {target} already exists and is not empty",
            "pass --overwrite or choose another --out",
        )
    replace = overwrite or (target.exists() and not any(target.iterdir()))  # an empty directory may go
    with staged_directory(target, overwrite=replace) as tmp:
        run = train_organism(config, tmp, progress=not json)
        if evaluate:
            evaluation = evaluate_adapter(tmp, progress=not json)
            record_evaluation(tmp, evaluation, "test")
    summary = {"out_dir": str(target), **read_training_record(target)}
    if (shipped / "adapter_model.safetensors").is_file():
        summary["matches_shipped"] = compare_adapters(target, shipped).to_dict()
        summary["shipped_evaluation"] = read_training_record(shipped).get("evaluation")
    if install:
        for name in ("adapter_model.safetensors", "adapter_config.json", "training.json"):
            shutil.copy2(target / name, shipped / name)
        summary["installed_to"] = str(shipped)
    if json:
        print_json(summary)
        return
    typer.echo(
        f"adapter written to {target} ({run.record['adapter_bytes'] / 1e6:.2f} MB, sha256 {run.adapter_sha256[:16]}…)"
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
    if install:
        typer.echo(f"installed into {shipped}")


@organism_app.command("eval")
def evaluate_cmd(
    adapter: Annotated[
        Path | None, typer.Option("--adapter", help="Adapter directory (default: the shipped one).")
    ] = None,
    split: SplitOpt = "test",
    limit: LimitOpt = None,
    max_new_tokens: TokensOpt = 48,
    json: JsonOpt = False,
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


def _given(**options: Any) -> dict[str, Any]:
    """The options the user passed (``None``: not given, the preset's value stands)."""
    return {k: v for k, v in options.items() if v is not None}


def _demo_overrides(
    alphas: str | None,
    blocks: str | None,
    targets: str | None,
    starts: str | None,
    injections: str | None,
    read_harmless: str | None,
    heldout: str | None,
    limit: int | None,
) -> dict[str, Any]:
    """Parse the grid options of ``organism demo`` into :class:`DemoSettings` fields."""
    if limit is not None and limit < 2:
        raise LensSafetyError(f"--limit {limit} leaves too few prompts", "use --limit 2 or more")
    kinds = None if targets is None else tuple(t.strip() for t in targets.split(",") if t.strip())
    unknown = [k for k in kinds or () if k not in ("attn_out", "mlp_out")]
    if unknown or kinds == ():
        raise LensSafetyError(
            f"--targets {targets} names no residual writer kind", "use attn_out, mlp_out or both"
        )
    chosen_blocks = parse_blocks(blocks, n_layers=None)  # demonstrate() checks the range
    grid = parse_alphas(alphas)
    return _given(
        limit=limit,
        alphas=None if grid is None else tuple(grid),
        blocks=None if chosen_blocks is None else tuple(chosen_blocks),
        targets=kinds,
        starts=None
        if starts is None
        else tuple(int(x) for x in parse_numbers(starts, "--starts", "10,15,20", integer=True)),
        injections=None
        if injections is None
        else tuple(parse_numbers(injections, "--injections", "100,150,200", integer=False)),
        read_harmless=None if read_harmless is None else tuple(parse_prompt_sets(read_harmless)),
        heldout=None if heldout is None else tuple(parse_heldout_pairs(heldout)),
    )


DemoLayerOpt = Annotated[
    int | None,
    typer.Option(
        "--layer", help="Fix the refusal direction's block instead of selecting it over every layer."
    ),
]
QuickOpt = Annotated[
    bool,
    typer.Option(
        "--quick",
        help="The first run (minutes on a CPU): 16 + 16 test prompts, 12 tokens, small sweeps, "
        "no base stages; the options below still override it.",
    ),
]
OrganismOpt = Annotated[
    str | None,
    typer.Option(
        "--organism", help="The model to abliterate and repair (default: the shipped smollm2-refusal)."
    ),
]
DemoOutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Keep the verified repaired models as OUT/rosi and OUT/conditional-rosi."),
]
DemoOverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out directory.")]
AlphasOpt = Annotated[
    str | None,
    typer.Option("--alphas", help="ROSI strengths swept on val for the repair (default 3,10,30,100)."),
]
MaxNewTokensOpt = Annotated[
    int | None, typer.Option("--max-new-tokens", help="Greedy tokens generated per prompt (default 48).")
]
BlocksOpt = Annotated[
    str | None,
    typer.Option("--blocks", help="Blocks whose writers the repair edits: 'all' (default) or e.g. 5-14."),
]
TargetsOpt = Annotated[
    str | None,
    typer.Option(
        "--targets",
        help="Writer kinds the repair edits, comma-separated (attn_out, mlp_out; default: both).",
    ),
]
ConditionalOpt = Annotated[
    bool,
    typer.Option(
        "--conditional/--no-conditional",
        help="Also repair with conditional ROSI (refusal injected along a harmfulness read direction).",
    ),
]
StartsOpt = Annotated[
    str | None,
    typer.Option("--starts", help="First edited blocks swept for conditional ROSI (default 10,15,20)."),
]
InjectionsOpt = Annotated[
    str | None,
    typer.Option(
        "--injections",
        help="Injections swept for conditional ROSI (projection units, default 100,150,200,250).",
    ),
]
ShrinkageOpt = Annotated[
    float | None,
    typer.Option(
        "--shrinkage",
        min=0.0,
        help="Shrinkage-LDA ridge of the read direction (default 1.0; 0: the plain mean difference).",
    ),
]
ReadHarmlessOpt = Annotated[
    str | None,
    typer.Option(
        "--read-harmless",
        help="Benign prompt sets added to the harmless train prompts of the read directions "
        f"(comma-separated; none for none; default {','.join(READ_HARMLESS)}).",
    ),
]
RefineOpt = Annotated[
    int | None,
    typer.Option("--refine", min=0, help="Bisection rounds on the injection after the conditional grid."),
]
HeldoutOpt = Annotated[
    str | None,
    typer.Option(
        "--heldout",
        help="Extra held-out pairs 'HARMFUL,HARMLESS' (';'-separated; none for none) on which the "
        "organism, abliterated and repaired stages are also scored "
        f"(default {';'.join(','.join(pair) for pair in HELDOUT_PAIRS)}).",
    ),
]


@organism_app.command("demo")
def demo_cmd(
    quick: QuickOpt = False,
    organism: OrganismOpt = None,
    out: DemoOutOpt = None,
    overwrite: DemoOverwriteOpt = False,
    limit: LimitOpt = None,
    layer: DemoLayerOpt = None,
    alphas: AlphasOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    blocks: BlocksOpt = None,
    targets: TargetsOpt = None,
    conditional: ConditionalOpt = True,
    starts: StartsOpt = None,
    injections: InjectionsOpt = None,
    shrinkage: ShrinkageOpt = None,
    template: TemplateBlindOpt = False,
    read_harmless: ReadHarmlessOpt = None,
    refine: RefineOpt = None,
    heldout: HeldoutOpt = None,
    json: JsonOpt = False,
) -> None:
    """Organism -> refusal direction -> abliteration -> ROSI / conditional-ROSI repair -> the base, held out.

    Every refusal rate is judged by the substring judge.
    """
    overrides = _demo_overrides(alphas, blocks, targets, starts, injections, read_harmless, heldout, limit)
    if injections is not None:
        overrides["relative_injections"] = None  # given in projection units
    overrides.update(
        _given(organism_spec=organism, max_new_tokens=max_new_tokens, refine=refine, direction_layer=layer),
        conditional=conditional,
        template=template,
    )
    if shrinkage is not None:
        overrides["shrinkage"] = shrinkage or None
    quiet_libraries()
    from lens_safety.organism.demonstration import DemoSettings, demonstrate

    settings = DemoSettings.quick() if quick else DemoSettings()
    result = demonstrate(settings, out=out, overwrite=overwrite, progress=not json, **overrides)
    if json:
        print_json(result.to_dict())
        return
    if not quick:
        for stage in result.stages:
            typer.echo(stage.line())
    typer.echo(result.summary())
